"""Offline checkpoint tools: read any layout's checkpoint in one process, inspect it, and convert it to and
from Hugging Face transformers directories. The trainer's own collective save/load is pretrain/checkpointing.py."""
