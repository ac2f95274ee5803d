"""The checksum manifest of a checkpoint: every file's size and sha256, checked before loading.

In a run the ranks share the hashing: rank r hashes every world_size-th file (sorted by name), so
a save or a load reads each byte once, spread over the job. Offline tools check all files alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch.distributed as dist

from .checkpoint_folders import COMPLETE, CheckpointError

MANIFEST = "MANIFEST.json"
UNHASHED = (MANIFEST, COMPLETE)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_files(folder: Path) -> list[str]:
    """Paths relative to `folder`, without the manifest and the marker themselves."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in UNHASHED)


def _entries(folder: Path, names: list[str]) -> dict:
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256(folder / n)} for n in names}


def _share(names: list[str]) -> list[str]:
    if dist.is_initialized():
        return names[dist.get_rank()::dist.get_world_size()]
    return names


def write_manifest(folder: Path) -> dict:
    """Collective when distributed: every rank hashes its share; rank 0 writes the manifest."""
    names = checkpoint_files(folder)
    mine = _entries(folder, _share(names))
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        (folder / MANIFEST).write_text(json.dumps({"files": dict(sorted(mine.items()))}, indent=1))
    return mine


def verify(folder: Path) -> None:
    """Raise CheckpointError naming the first file that is missing or differs from the manifest.
    Collective when distributed: every rank raises the same error."""
    problems = []
    manifest = folder / MANIFEST
    if not manifest.exists():
        problems.append(f"{manifest} is missing")
        files = {}
    else:
        files = json.loads(manifest.read_text())["files"]
    for name in _share(sorted(files)):
        path, expected = folder / name, files[name]
        if not path.exists():
            problems.append(f"{path} is listed in {MANIFEST} but missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}")
        elif sha256(path) != expected["sha256"]:
            problems.append(f"{path} does not match its sha256 in {MANIFEST} (corrupted or modified)")
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, problems)
        problems = sorted({p for part in parts for p in part})
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"refusing checkpoint {folder}: {problems[0]}{more}")
