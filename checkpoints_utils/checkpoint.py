"""Atomic checkpoints around DeepSpeed's `save_checkpoint` (DESIGN §6).

Layout of a run's `checkpoints/` folder:
    step_000100/            DeepSpeed's model and optimizer shards (every rank writes its own)
        loom_state.json     step, consumed tokens, fingerprint (rank 0)
        data_state.json     the position of every packing stream of the loader (gathered by rank 0);
                            layout-independent, so it also resumes under another data-parallel size
        loom_rank00000.pt   RNG states of global rank 0 (one per rank)
        config.yaml         the resolved config of the run
        COMPLETE            written by rank 0 after a barrier: all ranks finished writing
    latest                  the tag of the newest COMPLETE checkpoint, replaced atomically

DeepSpeed's own `latest` is not used: it is written without waiting for the other ranks. A
checkpoint without COMPLETE (a run killed while saving) is ignored and the previous one is used.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.loader import merge_states
from pretrain.config import TrainConfig, dump_yaml
from pretrain.train_state import TrainState

COMPLETE = "COMPLETE"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def complete_tags(run_dir: str | Path) -> list[str]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / COMPLETE).exists())


def latest_tag(run_dir: str | Path) -> str | None:
    """The tag named by `latest` if that checkpoint is complete, else the newest complete one."""
    root = checkpoint_dir(run_dir)
    latest = root / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        if (root / tag / COMPLETE).exists():
            return tag
    tags = complete_tags(run_dir)
    return tags[-1] if tags else None


def save(engine, run_dir: str | Path, state: TrainState, cfg: TrainConfig, keep_last: int, loader) -> str:
    root = checkpoint_dir(run_dir)
    tag = tag_for(state.step)
    rank = dist.get_rank()
    loader_states = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(loader.state_dict(), loader_states, dst=0)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(state.per_rank(), root / tag / f"loom_rank{rank:05d}.pt")
    if rank == 0:
        (root / tag / "loom_state.json").write_text(json.dumps(state.shared(), indent=2))
        (root / tag / "data_state.json").write_text(json.dumps(merge_states(loader_states)))
        dump_yaml(cfg, root / tag / "config.yaml")
    dist.barrier()
    if rank == 0:
        (root / tag / COMPLETE).write_text(f"{dist.get_world_size()}\n")
        tmp = root / "latest.tmp"
        tmp.write_text(tag + "\n")
        os.replace(tmp, root / "latest")
        for old in complete_tags(run_dir)[:-keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return tag


def load(engine, run_dir: str | Path, tag: str) -> TrainState:
    root = checkpoint_dir(run_dir)
    rank = dist.get_rank()
    per_rank_file = root / tag / f"loom_rank{rank:05d}.pt"
    saved_world = int((root / tag / COMPLETE).read_text().split()[0])
    if saved_world != dist.get_world_size() or not per_rank_file.exists():
        raise RuntimeError(f"{root / tag} was saved by {saved_world} processes; this run has "
                           f"{dist.get_world_size()}. Resume with the same layout (resharding comes "
                           f"with checkpoint conversion)")
    load_path, _ = engine.load_checkpoint(str(root), tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {root / tag}")
    shared = json.loads((root / tag / "loom_state.json").read_text())
    state = TrainState.restore(shared, torch.load(per_rank_file, weights_only=False))
    state.loader = json.loads((root / tag / "data_state.json").read_text())
    return state
