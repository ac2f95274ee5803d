"""Fault injection, to test recovery the way clusters fail: LOOM_FAULT=<point>:<step>:<rank> makes
that rank die abruptly (exit 137, as after SIGKILL) when it reaches <point> at <step>.
Points: "save" (after writing its checkpoint files, before the checkpoint is marked complete), "load"."""

from __future__ import annotations

import os


def maybe_fail(point: str, step: int, rank: int) -> None:
    spec = os.environ.get("LOOM_FAULT")
    if spec and spec.split(":") == [point, str(step), str(rank)]:
        print(f"LOOM_FAULT: rank {rank} dies at {point}, step {step}", flush=True)
        os._exit(137)
