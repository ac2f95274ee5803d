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

POINTS = ("save", "load", "nan", "hang", "disk_full", "spike")


def injected(point: str, step: int, rank: int) -> bool:
    for entry in filter(None, os.environ.get("LOOM_FAULT", "").split(",")):
        name, at, who = entry.split(":")
        if name not in POINTS:
            raise ValueError(f"LOOM_FAULT: unknown point {name!r} in {entry!r}; points: {', '.join(POINTS)}")
        if name == point and int(at) == step and who in ("*", str(rank)):
            return True
    return False


def maybe_fail(point: str, step: int, rank: int) -> None:
    if injected(point, step, rank):
        print(f"LOOM_FAULT: rank {rank} dies at {point}, step {step}", flush=True)
        os._exit(137)


def maybe_hang(step: int, rank: int) -> None:
    if injected("hang", step, rank):
        print(f"LOOM_FAULT: rank {rank} hangs at step {step}", flush=True)
        while True:
            time.sleep(60)


def maybe_fill_disk(step: int, rank: int) -> None:
    if injected("disk_full", step, rank):
        print(f"LOOM_FAULT: rank {rank} may write only 64 KiB per file from step {step}", flush=True)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
