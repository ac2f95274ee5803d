"""The trainer's checkpoints: atomic and verified, around DeepSpeed's `save_checkpoint`, loadable by any
parallel layout (DESIGN §6). Collective: every rank of the job calls `save` and `load`.

The files of one checkpoint (common/checkpoint_folders.py: the folders, COMPLETE and `latest`):
    step_000100/            DeepSpeed's model and optimizer shards (every rank writes its own)
        loom_state.json     step, consumed tokens, fingerprint, and the layout that saved it (rank 0)
        data_state.json     the position of every packing stream of the loader (gathered by rank 0);
                            layout-independent, so it also resumes under another data-parallel size
        loom_rank00000.pt   RNG states of global rank 0 (one per rank)
        config.yaml         the resolved config of the run
        MANIFEST.json       size and sha256 of every file above, hashed by all ranks after a barrier
        COMPLETE            written by rank 0 after the manifest: the checkpoint counts from here
        portable/           written on the first resume under another layout (pretrain/portable.py)
    latest                  the tag of the newest COMPLETE checkpoint, replaced atomically

DeepSpeed's own `latest` is not used: it is written without waiting for the other ranks. A
checkpoint without COMPLETE (a run killed while saving) is ignored, the previous one is used, and
the next save deletes it. Older complete checkpoints are deleted only after a newer one completed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from common.checkpoint_folders import (CheckpointError, checkpoint_root, complete_tags, folder_bytes, latest_tag,
                                       mark_complete, prune, remove_incomplete, tag_for)
from common.config import ConfigError, dump_yaml
from common.manifest import verify, write_manifest
from data_pipeline.loader import merge_states
from .config import TrainConfig, build_config
from .flops import param_counts
from .hooks import TrainHooks
from .portable import MODEL_FILE, load_portable, portable_from_deepspeed
from .train_state import TrainState

# Fields that change the weights' shapes or meaning: a checkpoint loads only into the same values.
ARCHITECTURE = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "vocab_pad_multiple",
                "qk_norm", "swin_norm", "norm_eps", "rope_theta", "rope_scaling", "qkv_bias")


def layout_record(cfg: TrainConfig, world_size: int) -> dict:
    p = cfg.parallel
    # dp: DeepSpeed's data-parallel size, over which ZeRO partitions: data x context ranks
    record = {"tp": p.tp, "pp": p.pp, "dp": world_size // (p.tp * p.pp), "zero_stage": p.zero_stage,
              "bf16": p.bf16, "world_size": world_size}
    return record | ({"cp": p.cp} if p.cp > 1 else {})  # checkpoints from before CP resume in their layout as saved


def estimated_bytes(cfg: TrainConfig) -> int:
    """A checkpoint's size before the first one exists: the weights in the training precision plus fp32
    master weights and Adam's two moments (what DeepSpeed writes), for the padded vocabulary."""
    m = cfg.model
    params = param_counts(m)["total"] + 2 * (m.padded_vocab_size - m.vocab_size) * m.dim
    return params * ((2 if cfg.parallel.bf16 else 4) + 12)


def ensure_space(run_dir: str | Path, cfg: TrainConfig, what: str) -> None:
    """Collective: raise CheckpointError on every rank when the filesystem of the checkpoints lacks room for
    one more checkpoint (sized as the newest one, else estimated), before anything is written."""
    root = checkpoint_root(run_dir)
    problem = [None]
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        tag = latest_tag(run_dir)
        needed = folder_bytes(root / tag) if tag else estimated_bytes(cfg)
        free = shutil.disk_usage(root).free
        if free < needed:
            problem[0] = (f"not enough disk for {what}: a checkpoint takes {needed / 2 ** 30:.2f} GiB "
                          f"({'the size of ' + tag if tag else 'estimated from the model'}), {root} has "
                          f"{free / 2 ** 30:.2f} GiB free; free space or set out_dir on a larger filesystem"
                          + (f" ({tag} and latest are intact)" if tag else ""))
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise CheckpointError(problem[0])


def save(engine, run_dir: str | Path, state: TrainState, cfg: TrainConfig, keep_last: int, loader,
         hooks: TrainHooks = TrainHooks()) -> str:
    """Collective. A failure to write on any rank (a full disk, a quota) removes the partial checkpoint and
    raises CheckpointError on every rank; the previous checkpoint and `latest` stay as they were."""
    root = checkpoint_root(run_dir)
    tag = tag_for(state.step)
    folder = root / tag
    rank, world = dist.get_rank(), dist.get_world_size()
    ensure_space(run_dir, cfg, f"the checkpoint of step {state.step}")
    if rank == 0:
        remove_incomplete(run_dir)  # leftovers of a save that was killed, this step's included
    loader_states = [None] * world if rank == 0 else None
    dist.gather_object(loader.state_dict(), loader_states, dst=0)
    hooks.saving(state.step, rank)
    error = write_files(engine, root, folder, state, cfg, loader_states)
    hooks.saved_files(state.step, rank)
    errors = [None] * world
    dist.all_gather_object(errors, None if error is None else f"rank {rank}: {error}")
    if any(errors):
        previous = latest_tag(run_dir)
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        dist.barrier()
        kept = f"The previous checkpoint {previous} and latest are" if previous else "Nothing else was"
        raise CheckpointError(f"saving {folder} failed ({'; '.join(e for e in errors if e)}); removed it. {kept} "
                              f"left as they were. Free space or a larger quota on {root}, then rerun to resume")
    dist.barrier()
    write_manifest(folder)
    if rank == 0:
        mark_complete(folder)
        prune(run_dir, keep_last)
    dist.barrier()
    return tag


def write_files(engine, root: Path, folder: Path, state: TrainState, cfg: TrainConfig, loader_states) -> str | None:
    """This rank's files of the checkpoint; the error (a full disk, a quota) instead of raising it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        engine.save_checkpoint(str(root), tag=tag_for(state.step), save_latest=False)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        dist.barrier()  # DeepSpeed's save ends with a barrier, which the exception skipped on this rank
        return write_error(e, folder)
    try:
        torch.save(state.per_rank(), folder / f"loom_rank{rank:05d}.pt")
        if rank == 0:
            shared = {**state.shared(), "layout": layout_record(cfg, world)}
            (folder / "loom_state.json").write_text(json.dumps(shared, indent=2))
            (folder / "data_state.json").write_text(json.dumps(merge_states(loader_states)))
            dump_yaml(cfg, folder / "config.yaml")
    except (OSError, RuntimeError) as e:
        return write_error(e, folder)
    return None


def write_error(error: Exception, folder: Path) -> str:
    """The OS's words for a failed write ("No space left on device", "File too large"): torch.save's error
    hides the errno, so write a 1 MiB probe file the same way and report what that says."""
    words = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    probe = folder / f".probe_{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(2 ** 20))
    except OSError as os_error:
        return f"{os_error.strerror} ({words})"
    finally:
        probe.unlink(missing_ok=True)
    return words


def tag_before(run_dir: str | Path, batch: int) -> str | None:
    """The newest complete checkpoint saved before global batch `batch` was drawn."""
    for tag in reversed(complete_tags(run_dir)):
        shared = json.loads((checkpoint_root(run_dir) / tag / "loom_state.json").read_text())
        if shared.get("batches", shared["step"]) < batch:
            return tag
    return None


def check_architecture(folder: Path, cfg: TrainConfig) -> None:
    saved = read_config(folder).model
    diffs = [f"model.{k}: checkpoint {getattr(saved, k)!r}, this run {getattr(cfg.model, k)!r}"
             for k in ARCHITECTURE if getattr(saved, k) != getattr(cfg.model, k)]
    if diffs:
        raise ConfigError(f"{folder} holds another model ({'; '.join(diffs)}); set these to the checkpoint's "
                          f"values or start a new out_dir")


def load(engine, run_dir: str | Path, tag: str, cfg: TrainConfig, log=print, hooks: TrainHooks = TrainHooks()
         ) -> TrainState:
    """Verify the checkpoint, then load it: DeepSpeed's own load in the saving layout, else the portable
    path (consolidated once by rank 0, sliced by every rank) for any other (TP, PP, DP, ZeRO, bf16)."""
    folder = checkpoint_root(run_dir) / tag
    verify(folder)
    check_architecture(folder, cfg)
    shared = json.loads((folder / "loom_state.json").read_text())
    rank, world = dist.get_rank(), dist.get_world_size()
    saved = shared.get("layout")  # None: a portable checkpoint (an import from Hugging Face)
    if saved == layout_record(cfg, world):
        load_path, _ = engine.load_checkpoint(str(folder.parent), tag=tag)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {folder}")
        state = TrainState.restore(shared, torch.load(folder / f"loom_rank{rank:05d}.pt", weights_only=False))
    else:
        portable = folder
        if saved is not None:
            portable = folder / "portable"
            log(f"{folder} was saved with layout {saved}; resharding to {layout_record(cfg, world)}")
            consolidated = (portable / MODEL_FILE).exists()
            dist.barrier()  # every rank has looked before any writes
            if not consolidated:  # every rank merges a share of the parameters
                portable_from_deepspeed(folder, saved, cfg.model.n_layers, portable, rank, world, dist.barrier)
        load_portable(engine, portable, cfg.model.n_layers, cfg.parallel.pp > 1, cfg.parallel.tp)
        state = TrainState.restore(shared, None)
    data_state = folder / "data_state.json"
    state.loader = json.loads(data_state.read_text()) if data_state.exists() else None
    hooks.loaded(state.step, rank)
    return state


def read_config(folder: Path) -> TrainConfig:
    cfg = build_config(folder / "config.yaml")
    cfg.model.resolve_preset()
    return cfg
