"""The model, its parallelism, the training loop and the trainer's own checkpoints, and the training config."""
