"""Atomic, verified checkpoints around DeepSpeed's `save_checkpoint`, loadable by any layout (DESIGN §6).

Layout of a run's `checkpoints/` folder:
    step_000100/            DeepSpeed's model and optimizer shards (every rank writes its own)
        loom_state.json     step, consumed tokens, fingerprint, and the layout that saved it (rank 0)
        data_state.json     the position of every packing stream of the loader (gathered by rank 0);
                            layout-independent, so it also resumes under another data-parallel size
        loom_rank00000.pt   RNG states of global rank 0 (one per rank)
        config.yaml         the resolved config of the run
        MANIFEST.json       size and sha256 of every file above, hashed by all ranks after a barrier
        COMPLETE            written by rank 0 after the manifest: the checkpoint counts from here
        portable/           written on the first resume under another layout (checkpoints_utils.portable)
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
import yaml

from data_pipeline.loader import merge_states
from pretrain import faults
from pretrain.config import ConfigError, TrainConfig, dump_yaml
from pretrain.train_state import TrainState
from .consolidate import CheckpointError
from .manifest import COMPLETE, verify, write_manifest
from .portable import MODEL_FILE, load_portable, portable_from_deepspeed

# Fields that change the weights' shapes or meaning: a checkpoint loads only into the same values.
ARCHITECTURE = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "vocab_pad_multiple",
                "qk_norm", "swin_norm", "norm_eps", "rope_theta")


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


def layout_record(cfg: TrainConfig, world_size: int) -> dict:
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "dp": world_size // (p.tp * p.pp), "zero_stage": p.zero_stage,
            "bf16": p.bf16, "world_size": world_size}


def mark_complete(folder: Path, root: Path) -> None:
    """Rank 0, after every rank finished writing and the manifest exists: COMPLETE, then `latest`."""
    (folder / COMPLETE).write_text("complete\n")
    tmp = root / "latest.tmp"
    tmp.write_text(folder.name + "\n")
    os.replace(tmp, root / "latest")


def remove_incomplete(root: Path) -> None:
    for path in root.iterdir() if root.is_dir() else []:
        if path.is_dir() and not (path / COMPLETE).exists():
            shutil.rmtree(path, ignore_errors=True)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def estimated_bytes(cfg: TrainConfig) -> int:
    """A checkpoint's size before the first one exists: the weights in the training precision plus fp32
    master weights and Adam's two moments (what DeepSpeed writes), for the padded vocabulary."""
    from pretrain.flops import param_counts

    m = cfg.model
    params = param_counts(m)["total"] + 2 * (m.padded_vocab_size - m.vocab_size) * m.dim
    return params * ((2 if cfg.parallel.bf16 else 4) + 12)


def ensure_space(run_dir: str | Path, cfg: TrainConfig, what: str) -> None:
    """Collective: raise CheckpointError on every rank when the filesystem of the checkpoints lacks room for
    one more checkpoint (sized as the newest one, else estimated), before anything is written."""
    root = checkpoint_dir(run_dir)
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


def save(engine, run_dir: str | Path, state: TrainState, cfg: TrainConfig, keep_last: int, loader) -> str:
    """Collective. A failure to write on any rank (a full disk, a quota) removes the partial checkpoint and
    raises CheckpointError on every rank; the previous checkpoint and `latest` stay as they were."""
    root = checkpoint_dir(run_dir)
    tag = tag_for(state.step)
    folder = root / tag
    rank, world = dist.get_rank(), dist.get_world_size()
    ensure_space(run_dir, cfg, f"the checkpoint of step {state.step}")
    if rank == 0:
        remove_incomplete(root)  # leftovers of a save that was killed, this step's included
    loader_states = [None] * world if rank == 0 else None
    dist.gather_object(loader.state_dict(), loader_states, dst=0)
    faults.maybe_fill_disk(state.step, rank)
    error = write_files(engine, root, folder, state, cfg, loader_states)
    faults.maybe_fail("save", state.step, rank)
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
        mark_complete(folder, root)
        for old in complete_tags(run_dir)[:-keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
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
        shared = json.loads((checkpoint_dir(run_dir) / tag / "loom_state.json").read_text())
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


def load(engine, run_dir: str | Path, tag: str, cfg: TrainConfig, log=print) -> TrainState:
    """Verify the checkpoint, then load it: DeepSpeed's own load in the saving layout, else the portable
    path (consolidated once by rank 0, sliced by every rank) for any other (TP, PP, DP, ZeRO, bf16)."""
    folder = checkpoint_dir(run_dir) / tag
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
            if rank == 0 and not (portable / MODEL_FILE).exists():
                portable_from_deepspeed(folder, saved, cfg.model.n_layers, portable)
            dist.barrier()
        load_portable(engine, portable, cfg.model.n_layers, cfg.parallel.pp > 1, cfg.parallel.tp)
        state = TrainState.restore(shared, None)
    data_state = folder / "data_state.json"
    state.loader = json.loads(data_state.read_text()) if data_state.exists() else None
    faults.maybe_fail("load", state.step, rank)
    return state


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run directory (its latest complete checkpoint)."""
    path = Path(path)
    if (path / "loom_state.json").exists():
        if not (path / COMPLETE).exists():
            raise CheckpointError(f"{path} is incomplete (no {COMPLETE}: its save did not finish)")
        return path
    tag = latest_tag(path)
    if tag is None:
        raise CheckpointError(f"{path}: neither a checkpoint nor a run directory with a complete checkpoint")
    return checkpoint_dir(path) / tag


def read_config(folder: Path) -> TrainConfig:
    from pretrain.config import build

    cfg = build(TrainConfig, yaml.safe_load((folder / "config.yaml").read_text()))
    cfg.model.resolve_preset()
    return cfg


def read_checkpoint(folder: Path, check: bool = True) -> tuple[dict, TrainConfig, dict]:
    """Full fp32 weights (canonical names, padded vocabulary), config and shared state of a checkpoint
    of any layout, in one process."""
    from .consolidate import read_deepspeed
    from .portable import read_params

    if check:
        verify(folder)
    cfg = read_config(folder)
    shared = json.loads((folder / "loom_state.json").read_text())
    saved = shared.get("layout")
    if saved is None:
        return read_params(folder), cfg, shared
    if (folder / "portable" / MODEL_FILE).exists():
        return read_params(folder / "portable"), cfg, shared
    params = read_deepspeed(folder, saved["tp"], saved["pp"], saved["dp"], saved["zero_stage"],
                            cfg.model.n_layers)["params"]
    return params, cfg, shared


def write_portable_checkpoint(run_dir: Path, params: dict, cfg: TrainConfig, step: int = 0) -> Path:
    """A complete checkpoint of weights alone (no optimizer state): `loom train` continues from it in
    any layout, with a fresh optimizer."""
    from .portable import write_portable

    root = checkpoint_dir(run_dir)
    folder = root / tag_for(step)
    write_portable(folder, params)
    state = TrainState(step=step)
    (folder / "loom_state.json").write_text(json.dumps(state.shared(), indent=2))
    dump_yaml(cfg, folder / "config.yaml")
    write_manifest(folder)
    mark_complete(folder, root)
    return folder


def inspect(path: str | Path, check: bool = True) -> dict:
    """What `loom ckpt inspect` prints: step, layout, tokens seen, fingerprint, model, size, completeness."""
    folder = Path(path)
    if not (folder / "loom_state.json").exists():
        folder = resolve_checkpoint(path)
    shared = json.loads((folder / "loom_state.json").read_text())
    cfg = read_config(folder)
    files = [p for p in folder.rglob("*") if p.is_file()]
    report = {"checkpoint": str(folder), "complete": (folder / COMPLETE).exists(), "step": shared["step"],
              "layout": shared.get("layout") or "portable (full tensors; any layout)",
              "consumed_tokens": shared["consumed_tokens"], "fingerprint": shared.get("fingerprint") or None,
              "model": {k: getattr(cfg.model, k) for k in ("preset", *ARCHITECTURE)},
              "files": len(files), "bytes": folder_bytes(folder),
              "config": str(folder / "config.yaml")}
    if check:
        try:
            verify(folder)
            report["manifest"] = "ok: every file matches its sha256"
        except CheckpointError as e:
            report["manifest"] = f"FAILED: {e}"
    return report
