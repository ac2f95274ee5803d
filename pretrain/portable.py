"""Portable checkpoints: full fp32 tensors under canonical names, loaded by any layout.

A portable checkpoint folder holds
    model.safetensors       fp32 weights, named as in the single-process Transformer
    optimizer.safetensors   Adam moments as "exp_avg/<name>", "exp_avg_sq/<name>" (absent after an
                            import from Hugging Face: the optimizer then starts fresh)
    engine_state.json       optimizer step, LR scheduler state, DeepSpeed's step and sample counters

It is written by `loom convert from-hf`, and by a run that resumes a DeepSpeed checkpoint saved
with another layout (into `<checkpoint>/portable/`, once; or ahead of time by `loom ckpt
consolidate`). That consolidation streams: the files' layout (header and offsets) is known from the
shapes alone, so rank 0 writes the headers and sizes, and then every rank of the new job reads, merges
and writes its share of the parameters, one at a time, at their offsets (`portable_from_deepspeed`):
memory holds one parameter per rank, and no rank waits longer than the slowest share. Each rank of the
new layout reads only its tensor-parallel slices (safetensors reads lazily) and hands them to DeepSpeed
through its fragment API, which places them in the ZeRO partitions of any stage.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from . import accelerator  # noqa: F401  (before DeepSpeed)
import deepspeed  # noqa: E402
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save_file

from common.checkpoint_folders import CheckpointError
from .consolidate import MOMENTS, TESTED_DEEPSPEED, DeepSpeedCheckpoint, canonical_name, tp_slice

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
ENGINE_FILE = "engine_state.json"


def write_portable(folder: Path, params: dict, moments: dict | None = None, engine_state: dict | None = None) -> None:
    """Write atomically: into `<folder>.tmp`, renamed when complete."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in params.items()}, tmp / MODEL_FILE)
    if moments:
        save_file({f"{k}/{n}": t.contiguous() for k in MOMENTS for n, t in moments[k].items()}, tmp / OPTIMIZER_FILE)
    if engine_state:
        (tmp / ENGINE_FILE).write_text(json.dumps(engine_state, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def safetensors_layout(entries: list[tuple[str, tuple]]) -> tuple[bytes, dict[str, int], int]:
    """The header of a safetensors file of fp32 tensors (name, shape), laid out in name order as safetensors'
    own writer does, their byte offsets in the file, and the file's size."""
    header, offset = {}, 0
    for name, shape in sorted(entries):
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, {name: len(prefix) + h["data_offsets"][0] for name, h in header.items()}, len(prefix) + offset


def write_at(fd: int, tensor: torch.Tensor, offset: int) -> None:
    data = memoryview(tensor.detach().contiguous().numpy()).cast("B")
    while data:  # one write moves at most ~2 GiB on Linux
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def portable_from_deepspeed(ckpt: Path, saved: dict, n_layers: int, folder: Path, rank: int = 0, world: int = 1,
                            barrier=lambda: None) -> None:
    """Consolidate DeepSpeed shards saved with layout `saved` (tp, pp, dp, zero_stage) into `folder`, with `world`
    processes (this one is `rank`; all call it, `barrier` waits for all): rank r writes parameters r, r + world, ...
    of the name order, each read, merged and written alone."""
    source = DeepSpeedCheckpoint(ckpt, saved["tp"], saved["pp"], saved["dp"], saved["zero_stage"], n_layers)
    names = source.names()
    files = {MODEL_FILE: [(n, source.shape(n)) for n in names],
             OPTIMIZER_FILE: [(f"{k}/{n}", source.shape(n)) for k in MOMENTS for n in names]}
    layouts = {file: safetensors_layout(entries) for file, entries in files.items()}
    tmp = folder.with_name(folder.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for file, (prefix, _, size) in layouts.items():
            with open(tmp / file, "wb") as f:
                f.write(prefix)
                f.truncate(size)
    barrier()
    for file, (_, offsets, _) in layouts.items():
        fd = os.open(tmp / file, os.O_WRONLY)
        try:
            for i, name in enumerate(sorted(offsets)):
                if i % world == rank:
                    state, base = ("param", name) if file == MODEL_FILE else name.split("/", 1)
                    write_at(fd, source.full(base, state), offsets[name])
        finally:
            os.close(fd)
    barrier()
    if rank == 0:
        (tmp / ENGINE_FILE).write_text(json.dumps({**source.engine, "optimizer_step": source.optimizer_step},
                                                  indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    barrier()


def read_params(folder: Path) -> dict:
    with safe_open(folder / MODEL_FILE, "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _set_model_param(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """The low-precision copy the forward pass uses (the fp32 master is set through DeepSpeed)."""
    if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank's piece of the flattened, padded parameter
        part = param.ds_tensor
        rank = dist.get_rank(group=param.ds_process_group)
        piece = value.flatten()[rank * part.numel():(rank + 1) * part.numel()]
        part.data.zero_()
        part.data[:piece.numel()].copy_(piece)
    else:
        param.data.copy_(value)


def _ensure_optimizer_states(engine, step: int) -> None:
    """Adam moments exist before the first step (DeepSpeed's ZeRO optimizers create them lazily, at the first
    step, keyed by the flat fp32 partitions), then set their step."""
    zero = engine.optimizer
    base = zero.optimizer
    partitions = getattr(zero, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if partitions is None:
        partitions = getattr(zero, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    for flat in partitions or []:
        if not base.state.get(flat):
            base.state[flat] = {"step": torch.zeros((), dtype=torch.float32, device=flat.device),
                                "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(zero, "single_partition_of_fp32_groups"):
        if not hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # a private method of DeepSpeed's ZeRO-1/2
            raise CheckpointError(f"DeepSpeed {deepspeed.__version__}'s ZeRO optimizer has no "
                                  f"_lazy_init_hp_params_optimizer_state: Loom loads checkpoints through the "
                                  f"internals of DeepSpeed {TESTED_DEEPSPEED}; install that version")
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for state in base.state.values():
        if "step" in state:
            state["step"] = torch.full_like(state["step"], float(step)) if torch.is_tensor(state["step"]) else step


def load_portable(engine, folder: Path, n_layers: int, pipeline: bool, tp: int) -> int:
    """Load a portable checkpoint into this rank's part of `engine`; returns the optimizer step."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    engine_state = json.loads((folder / ENGINE_FILE).read_text()) if (folder / ENGINE_FILE).exists() else None
    with_optimizer = (folder / OPTIMIZER_FILE).exists() and engine_state is not None
    step = engine_state["optimizer_step"] if with_optimizer else 0
    if with_optimizer:
        _ensure_optimizer_states(engine, step)
    opener = safe_open(folder / OPTIMIZER_FILE, "pt") if with_optimizer else nullcontext()
    with safe_open(folder / MODEL_FILE, "pt") as model_file, opener as optimizer_file:
        names = set(model_file.keys())
        for local, param in engine.module.named_parameters():
            name = canonical_name(local, n_layers, pipeline)
            if name not in names:
                raise CheckpointError(f"{folder / MODEL_FILE} has no tensor {name!r}: it holds another model")
            value = tp_slice(model_file.get_tensor(name), name, tp_rank, tp).to(param.device)
            shape = tuple(getattr(param, "ds_shape", param.shape))
            if tuple(value.shape) != shape:
                raise CheckpointError(f"{folder / MODEL_FILE}: {name} has shape {tuple(value.shape)} for this "
                                      f"rank, the model expects {shape}: the checkpoint holds another model size")
            _set_model_param(param, value)
            safe_set_full_fp32_param(param, value)
            if optimizer_file is not None:
                for key in MOMENTS:
                    moment = tp_slice(optimizer_file.get_tensor(f"{key}/{name}"), name, tp_rank, tp)
                    safe_set_full_optimizer_state(param, moment.to(param.device), key)
    if with_optimizer:
        scheduler = engine.lr_scheduler
        scheduler.load_state_dict(engine_state["lr_scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        engine.global_steps = engine_state["global_steps"]
        engine.global_samples = engine_state["global_samples"]
        engine.skipped_steps = engine_state["skipped_steps"]
    return step
