"""The checkpoint folders of a run, for both trainers (the language model's and the visual tokenizer's).

    OUT_DIR/checkpoints/
        step_000100/    one checkpoint: the trainer's files, then COMPLETE once every one of them is written
        latest          the tag of the newest COMPLETE checkpoint, replaced atomically
A folder without COMPLETE (a run killed while saving) is never read, and the next save removes it. Older
complete checkpoints are deleted only after a newer one completed. Steps are read from the folder names,
so checkpoints whose tags have another width (the visual tokenizer's had 7 digits) still count.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"


class CheckpointError(Exception):
    """A checkpoint that cannot be used or written, with the file and the reason."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step_"))


def complete_tags(run_dir: str | Path) -> list[str]:
    """Tags of the complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).exists()), key=step_of)


def latest_tag(run_dir: str | Path) -> str | None:
    """The tag named by `latest` if that checkpoint is complete, else the newest complete one."""
    root = checkpoint_root(run_dir)
    latest = root / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        if (root / tag / COMPLETE).exists():
            return tag
    tags = complete_tags(run_dir)
    return tags[-1] if tags else None


def mark_complete(folder: Path) -> None:
    """After every file of the checkpoint is written: COMPLETE, then `latest`."""
    (folder / COMPLETE).write_text("complete\n")
    tmp = folder.parent / "latest.tmp"
    tmp.write_text(folder.name + "\n")
    os.replace(tmp, folder.parent / "latest")


def remove_incomplete(run_dir: str | Path) -> None:
    """Leftovers of saves that were killed (folders without COMPLETE)."""
    root = checkpoint_root(run_dir)
    for path in root.iterdir() if root.is_dir() else []:
        if path.is_dir() and not (path / COMPLETE).exists():
            shutil.rmtree(path, ignore_errors=True)


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints."""
    for old in complete_tags(run_dir)[:-keep_last]:
        shutil.rmtree(checkpoint_root(run_dir) / old, ignore_errors=True)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
