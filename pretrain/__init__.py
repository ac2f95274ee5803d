"""The model, parallelism, training loop and config."""
