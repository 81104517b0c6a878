"""Training: data preparation, the trainer and evaluator, experiments and export."""

# How the CLI and the processes it starts (`mmrec corrupt --jobs`) format their log records.
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
