"""Training: distributed setup, optimisation, checkpoints, run logs and the trainer."""
