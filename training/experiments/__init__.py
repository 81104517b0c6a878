"""Experiments built on training runs: the QARM pipeline, cold-start evaluation, R2MR reports, the results tables."""
