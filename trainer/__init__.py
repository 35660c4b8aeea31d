"""Training, evaluation, checkpointing and launch."""
