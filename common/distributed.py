"""The process group of a torchrun worker, set up one way for both trainers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Process:
    """This process's place in the job, from torchrun's environment."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_process_group(backend: str = "auto", timeout_s: float | None = None, alone: bool = True) -> Process:
    """torch.distributed from torchrun's variables (one process without them). backend 'auto': nccl where
    CUDA is, else gloo. `alone`: create the group for a single process too (megatron's groups need one)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized() and (alone or world > 1):
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return Process(rank, world, local_rank, device)
