"""Checkpoints: atomic saves, resume, and (later) resharding and Hugging Face conversion."""
