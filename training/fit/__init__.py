"""Fitting: the trainer, its batch samplers, the full-ranking evaluator and its metrics."""
