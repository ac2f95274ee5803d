"""Console, metrics.jsonl and TensorBoard logging, written by global rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path

from data_pipeline.vocab import LOSS_KIND_NAMES


def losses_by_kind(sums) -> dict:
    """(2, kinds) [loss sum, count] -> {'total': mean, 'text': mean, ...} for kinds that occur."""
    loss_sum, count = sums[0].tolist(), sums[1].tolist()
    out = {"total": sum(loss_sum[1:]) / max(sum(count[1:]), 1)}
    for kind, name in LOSS_KIND_NAMES.items():
        if count[kind] > 0:
            out[name] = loss_sum[kind] / count[kind]
    return out


def bits_per_token(losses: dict) -> dict:
    """Mean image and video losses (nats) in bits: the code length of a visual token under the model."""
    return {k: losses[k] / math.log(2) for k in ("image", "video") if k in losses}


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
            for key, value in record.items():
                if isinstance(value, dict):
                    for sub, v in value.items():
                        self.writer.add_scalar(f"{key}/{sub}", v, step)
                elif isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def summarize(records: list[dict], last: int = 10) -> dict:
    """Training loss per modality at the first step and averaged over the last `last` steps, and
    held-out loss before training and at the end, where the run evaluated."""
    train = [r for r in records if "loss" in r]
    if not train:
        return {}
    tail = train[-last:]
    kinds = set(train[0]["loss"]) & set.intersection(*(set(r["loss"]) for r in tail))
    summary = {"steps": train[-1]["step"],
               "initial_loss": {k: train[0]["loss"][k] for k in sorted(kinds)},
               "final_loss": {k: sum(r["loss"][k] for r in tail) / len(tail) for k in sorted(kinds)},
               "consumed_tokens": train[-1]["consumed_tokens"]}
    evals = [r for r in records if "eval_loss" in r]
    if len(evals) >= 2:
        summary["initial_eval_loss"], summary["final_eval_loss"] = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    return summary
