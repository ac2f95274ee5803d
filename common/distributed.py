"""The process group of a torchrun worker, set up one way for both trainers, and the one place that decides a
process's device, process-group backend and DeepSpeed accelerator (`plan_device`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class Process:
    """This process's place in the job, from torchrun's environment."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


@dataclass(frozen=True)
class DevicePlan:
    """Where a process computes and how it talks: decided together, since each constrains the others."""

    device_type: str   # 'cuda' or 'cpu'
    backend: str       # torch.distributed backend: 'nccl' (CUDA tensors) or 'gloo' (CPU tensors)
    accelerator: str   # DeepSpeed's accelerator (DS_ACCELERATOR): where its engine puts the model: 'cuda' or 'cpu'


def plan_device(backend: str = "auto") -> DevicePlan:
    """The device, backend and DeepSpeed accelerator for parallel.backend `backend` on this host.

    'auto' trains on CUDA with nccl where torch sees a GPU, else on the CPU with gloo; 'gloo' trains on the CPU
    even on a GPU host. Refuses what cannot work together: nccl without CUDA, or a DS_ACCELERATOR set in the
    environment that would put DeepSpeed's engine on the other device."""
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"parallel.backend must be 'auto', 'nccl' or 'gloo', got '{backend}'")
    if backend == "nccl" and not cuda:
        raise ConfigError("parallel.backend=nccl needs CUDA, and torch sees no GPU on this host "
                          "(torch.cuda.is_available() is False): use parallel.backend=auto or gloo")
    device_type = "cuda" if backend == "nccl" else "cpu"
    requested = os.environ.get("DS_ACCELERATOR")
    if requested and requested != device_type:
        raise ConfigError(f"DS_ACCELERATOR={requested} contradicts parallel.backend={backend}, which trains on "
                          f"{device_type} here: unset DS_ACCELERATOR or set it to {device_type}")
    return DevicePlan(device_type, backend, device_type)


def init_process_group(backend: str = "auto", timeout_s: float | None = None, alone: bool = True) -> Process:
    """torch.distributed from torchrun's variables (one process without them), on the device `plan_device` picks.
    `alone`: create the group for a single process too (megatron's groups need one)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    plan = plan_device(backend)
    backend, device = plan.backend, torch.device("cpu")
    if plan.device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized() and (alone or world > 1):
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return Process(rank, world, local_rank, device)
