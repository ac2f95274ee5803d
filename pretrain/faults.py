"""Fault injection, to test recovery the way clusters fail. LOOM_FAULT holds comma-separated
`<point>:<step>:<rank>` entries; the rank named (`*`: every rank) meets the fault at that step:

    save       dies abruptly (exit 137, as after SIGKILL) after writing its checkpoint files, before the
               checkpoint is marked complete
    load       dies abruptly after loading a checkpoint
    nan        its loss becomes NaN (so do the gradients, on every rank after the all-reduce)
    hang       sleeps forever before the step's first collective, as a rank stuck in a collective does
    disk_full  its file-size limit drops to 64 KiB before the checkpoint of that step, so its writes fail
               (EFBIG), as on a full disk
    spike      the loss of global batch <step> (a batch index, not an optimizer step) is reported 10x
               higher, as after a bad batch; it follows the batch, so a rollback that skips it sees no spike
"""

from __future__ import annotations

import os
import resource
import time

import torch

from .hooks import TrainHooks

POINTS = ("save", "load", "nan", "hang", "disk_full", "spike")


class FaultInjection(TrainHooks):
    """The faults of LOOM_FAULT at the training loop's named points (pretrain/hooks.py)."""

    def __init__(self, spec: str):
        self.entries = []
        for entry in filter(None, spec.split(",")):
            name, at, who = entry.split(":")
            if name not in POINTS:
                raise ValueError(f"LOOM_FAULT: unknown point {name!r} in {entry!r}; points: {', '.join(POINTS)}")
            self.entries.append((name, int(at), who))

    @classmethod
    def from_env(cls) -> list[TrainHooks]:
        """[the faults of LOOM_FAULT], or [] when it is unset."""
        spec = os.environ.get("LOOM_FAULT", "")
        return [cls(spec)] if spec else []

    def injected(self, point: str, step: int, rank: int) -> bool:
        return any(name == point and at == step and who in ("*", str(rank)) for name, at, who in self.entries)

    def die(self, point: str, step: int, rank: int) -> None:
        if self.injected(point, step, rank):
            print(f"LOOM_FAULT: rank {rank} dies at {point}, step {step}", flush=True)
            os._exit(137)

    def step_started(self, step, rank):
        if self.injected("hang", step, rank):
            print(f"LOOM_FAULT: rank {rank} hangs at step {step}", flush=True)
            while True:
                time.sleep(60)

    def micro_batch_loss(self, step, rank, loss, sums):
        if not self.injected("nan", step, rank):
            return loss, sums
        nan = torch.tensor(float("nan"), device=loss.device)  # the loss sums turn NaN, the counts stay
        return loss * nan, sums * torch.tensor([[float("nan")], [1.0]], device=sums.device)

    def step_sums(self, batch, rank, sums):
        if self.injected("spike", batch, rank):
            sums[0] *= 10
        return sums

    def saving(self, step, rank):
        if self.injected("disk_full", step, rank):
            print(f"LOOM_FAULT: rank {rank} may write only 64 KiB per file from step {step}", flush=True)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def saved_files(self, step, rank):
        self.die("save", step, rank)

    def loaded(self, step, rank):
        self.die("load", step, rank)
