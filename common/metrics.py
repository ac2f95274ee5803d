"""metrics.jsonl and TensorBoard logging of a trainer, written by global rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: str | Path, active: bool, tensorboard: bool, resume_step: int):
        self.active = active
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not active:
            return
        self.rewind(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def rewind(self, step: int) -> None:
        """Drop the records of steps after `step` (a resume or a rollback to it): they are trained again."""
        if self.active and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.writer is not None:
            self._scalars("", record, step)

    def _scalars(self, prefix: str, record: dict, step: int) -> None:
        """Every number of a nested record as a TensorBoard scalar named by its path (eval_loss/image)."""
        for key, value in record.items():
            if isinstance(value, dict):
                self._scalars(f"{prefix}{key}/", value, step)
            elif isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
