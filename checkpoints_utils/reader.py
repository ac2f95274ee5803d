"""A checkpoint of any layout read in one process, with no process group: what the offline tools use
(`loom ckpt inspect`, `loom convert`, `loom eval`, `loom generate`)."""

from __future__ import annotations

import json
from pathlib import Path

from common.checkpoint_folders import (COMPLETE, CheckpointError, checkpoint_root, folder_bytes, latest_tag,
                                       mark_complete, tag_for)
from common.config import dump_yaml
from common.manifest import verify, write_manifest
from pretrain.checkpointing import ARCHITECTURE, read_config
from pretrain.config import TrainConfig
from pretrain.consolidate import read_deepspeed
from pretrain.portable import MODEL_FILE, portable_from_deepspeed, read_params, write_portable
from pretrain.train_state import TrainState


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
    return checkpoint_root(path) / tag


def read_checkpoint(folder: Path, check: bool = True) -> tuple[dict, TrainConfig, dict]:
    """Full fp32 weights (canonical names, padded vocabulary), config and shared state of a checkpoint
    of any layout, in one process."""
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


def consolidate(path: str | Path, check: bool = True, log=print) -> Path:
    """Write a DeepSpeed checkpoint's portable form (`<checkpoint>/portable/`) ahead of a resume under another
    layout, streaming one parameter at a time; returns that folder (at once where it exists)."""
    folder = resolve_checkpoint(path)
    if check:
        verify(folder)
    saved = json.loads((folder / "loom_state.json").read_text()).get("layout")
    if saved is None:
        raise CheckpointError(f"{folder} is already portable (an import, or weights alone)")
    portable = folder / "portable"
    if (portable / MODEL_FILE).exists():
        log(f"{portable} exists")
        return portable
    portable_from_deepspeed(folder, saved, read_config(folder).model.n_layers, portable)
    log(f"consolidated {folder} (layout {saved}) into {portable}: {folder_bytes(portable) / 2 ** 20:.1f} MiB")
    return portable


def write_portable_checkpoint(run_dir: Path, params: dict, cfg: TrainConfig, step: int = 0) -> Path:
    """A complete checkpoint of weights alone (no optimizer state): `loom train` continues from it in
    any layout, with a fresh optimizer."""
    root = checkpoint_root(run_dir)
    folder = root / tag_for(step)
    write_portable(folder, params)
    state = TrainState(step=step)
    (folder / "loom_state.json").write_text(json.dumps(state.shared(), indent=2))
    dump_yaml(cfg, folder / "config.yaml")
    write_manifest(folder)
    mark_complete(folder)
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
