"""DeepSpeed picks its accelerator when first imported: on a machine without CUDA, say CPU first
(import this module before `deepspeed`)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
