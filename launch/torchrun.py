"""Starting torchrun on the local machine for `loom train` called without it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_pipeline.shards import read_json
from common.config import ConfigError
from pretrain.config import TrainConfig


def inside_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_sources(cfg: TrainConfig) -> None:
    """Refuse missing token directories before any process starts."""
    for name, src in cfg.data.sources.items():
        if not os.path.isdir(src.path):
            raise ConfigError(f"data.sources.{name}.path: directory not found: {src.path}")
        if not os.path.isfile(os.path.join(src.path, "manifest.json")):
            raise ConfigError(f"data.sources.{name}.path: {src.path} has no manifest.json; "
                              f"write token shards there with `loom data tokenize`")
        read_json(os.path.join(src.path, "manifest.json"))


def run_torchrun(loom_argv: list[str], nproc: int, out_dir: str | None = None) -> int:
    """torchrun --standalone with `nproc` processes, each running `python -m launch.cli loom_argv`. Exits 0
    after a SIGTERM that the training run in `out_dir` answered with a preemption checkpoint."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "launch.cli", *loom_argv]
    # torchrun's agent answers a failed worker with its own traceback; the workers have already
    # printed their one-line error, so keep only the agent's last line.
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
    agent_noise = False
    with passing_sigterm([proc]) as received:
        for line in proc.stderr:
            if line.startswith("Traceback") and not line.startswith("[rank"):
                agent_noise = True
            if not agent_noise or "--debug" in loom_argv:
                sys.stderr.write(line)
        code = proc.wait()
    if code and received and out_dir and preempted_since(out_dir, started):
        return 0
    if code and agent_noise and "--debug" not in loom_argv:
        sys.stderr.write(f"loom: {nproc} training processes exited with an error (exit code {code}); "
                         f"rerun with --debug for tracebacks\n")
    return code


@contextlib.contextmanager
def passing_sigterm(procs: list[subprocess.Popen]):
    """While inside: SIGTERM to this process is passed on to `procs` (torchrun passes it to its workers, which
    save a checkpoint) instead of ending this process. Yields the list of signals received."""
    received = []

    def forward(signum, frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)
    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def preempted_since(out_dir: str, started: float) -> bool:
    """Whether the run in `out_dir` ended after `started` with a preemption checkpoint (summary.json)."""
    summary = Path(out_dir) / "summary.json"
    try:
        return summary.stat().st_mtime >= started and bool(json.loads(summary.read_text()).get("preempted"))
    except (OSError, ValueError):
        return False


def reexec_under_torchrun(args, loom_argv: list[str], nproc: int, out_dir: str | None = None,
                          always: bool = False) -> int | None:
    """The one way a command runs itself on several processes: outside torchrun, with nproc > 1 (or `always`),
    start torchrun running `loom loom_argv` (with --debug passed on) and return its exit code. Inside torchrun, or
    for one process: None, and the caller does the work in this process."""
    if inside_torchrun() or (nproc == 1 and not always):
        return None
    return run_torchrun((["--debug"] if args.debug else []) + loom_argv, nproc, out_dir)


def exit_now(code: int) -> None:
    """End a finished worker without Python's interpreter teardown (about 2 s of freeing torch, megatron and
    DeepSpeed modules per process, and the place where process-group destructors can hang): every file of the
    run is closed by now; only the standard streams need flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
