"""Named points of the training loop, where code above the trainer acts without the loop naming it.

`loom train` hands `train()` a list of hooks: fault injection for tests (pretrain/faults.py) and
samples drawn from saved checkpoints (analysis/samples.py). Every point is a no-op here.
"""

from __future__ import annotations

import torch


class TrainHooks:
    def step_started(self, step: int, rank: int) -> None:
        """Before the first collective of optimizer step `step`."""

    def micro_batch_loss(self, step: int, rank: int, loss: torch.Tensor, sums: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch's loss and per-kind [loss sum, count], before its backward."""
        return loss, sums

    def step_sums(self, batch: int, rank: int, sums: torch.Tensor) -> torch.Tensor:
        """The all-reduced per-kind sums of global batch `batch`, before the loss checks."""
        return sums

    def saving(self, step: int, rank: int) -> None:
        """Before this rank writes its files of the checkpoint of `step`."""

    def saved_files(self, step: int, rank: int) -> None:
        """After this rank wrote them, before the checkpoint is hashed and marked complete."""

    def loaded(self, step: int, rank: int) -> None:
        """After a checkpoint (of `step`) was loaded."""

    def checkpoint_complete(self, folder, step: int, last: bool) -> None:
        """A checkpoint is complete (on every rank)."""

    def preempted(self) -> None:
        """Training stops early after a SIGTERM (the checkpoint is saved)."""

    def finished(self) -> dict:
        """Training ended; what to add to the run's summary."""
        return {}


class Hooks(TrainHooks):
    """Several hooks called in order; the transforming points pass each one's result to the next."""

    def __init__(self, hooks: list[TrainHooks] = ()):
        self.hooks = list(hooks)

    def step_started(self, step, rank):
        for h in self.hooks:
            h.step_started(step, rank)

    def micro_batch_loss(self, step, rank, loss, sums):
        for h in self.hooks:
            loss, sums = h.micro_batch_loss(step, rank, loss, sums)
        return loss, sums

    def step_sums(self, batch, rank, sums):
        for h in self.hooks:
            sums = h.step_sums(batch, rank, sums)
        return sums

    def saving(self, step, rank):
        for h in self.hooks:
            h.saving(step, rank)

    def saved_files(self, step, rank):
        for h in self.hooks:
            h.saved_files(step, rank)

    def loaded(self, step, rank):
        for h in self.hooks:
            h.loaded(step, rank)

    def checkpoint_complete(self, folder, step, last):
        for h in self.hooks:
            h.checkpoint_complete(folder, step, last)

    def preempted(self):
        for h in self.hooks:
            h.preempted()

    def finished(self):
        return {k: v for h in self.hooks for k, v in h.finished().items()}
