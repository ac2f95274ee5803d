"""`loom launch`: torchrun on one or many nodes, directly, as an sbatch script, or over ssh from a hostfile.

Every node runs `loom launch` itself (the sbatch script and the ssh commands call it with the node's
endpoint and run id), which runs `python -m torch.distributed.run` with a c10d rendezvous (all nodes
meet at one HOST:PORT under one run id, so nodes may start in any order and torchrun can restart the
group after a failure), then `-m launch.cli train CONFIG overrides`. Environment variables that
configure the communication stack and Loom (NCCL_*, GLOO_*, CUDA_*, TORCH_*, ...) set where
`loom launch` runs are passed on to every node.

SIGTERM (a preemption): the workers save a checkpoint at the current step and exit 0; the node's
`loom launch` passes the signal on to torchrun if it did not get it itself and exits 0 once the run
recorded the preemption (out_dir/summary.json), although torchrun's agent exits 1 after a signal.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .torchrun import passing_sigterm, preempted_since

PASSED_ENV_PREFIXES = ("NCCL_", "GLOO_", "CUDA_", "TORCH_", "TORCHELASTIC_", "OMP_", "MKL_", "DS_", "HF_", "FI_",
                       "UCX_", "LOOM_", "PYTHONPATH")


@dataclass
class Launch:
    config: str
    overrides: list[str]
    nnodes: int
    nproc_per_node: int
    rdzv_endpoint: str
    node_rank: int | None = None
    max_restarts: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    shutdown_timeout: int = 120
    """Seconds torchrun's agent gives its workers after a signal (to save a checkpoint) before SIGKILL."""

    def torchrun(self, endpoint: str | None = None, run_id: str | None = None, nnodes: str | None = None,
                 node_rank: int | None = None) -> list[str]:
        """The command one node runs (shell variables may stand in for endpoint, run id and node count)."""
        rank = self.node_rank if node_rank is None else node_rank
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes or self.nnodes}",
                f"--nproc-per-node={self.nproc_per_node}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint or self.rdzv_endpoint}", f"--rdzv-id={run_id or self.run_id}",
                f"--max-restarts={self.max_restarts}", f"--shutdown-timeout={self.shutdown_timeout}",
                *([f"--node-rank={rank}"] if rank is not None else []),
                "-m", "launch.cli", "train", self.config, *self.overrides]

    def node_command(self, endpoint: str, run_id: str, nnodes: str, node_rank: int | None = None) -> list[str]:
        """`loom launch` as one node runs it (the same command, for this node's torchrun)."""
        return [sys.executable, "-m", "launch.cli", "launch", self.config, *self.overrides, f"--nnodes={nnodes}",
                f"--nproc-per-node={self.nproc_per_node}", f"--rdzv-endpoint={endpoint}", f"--run-id={run_id}",
                f"--max-restarts={self.max_restarts}", f"--shutdown-timeout={self.shutdown_timeout}",
                *([f"--node-rank={node_rank}"] if node_rank is not None else [])]


def passed_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(PASSED_ENV_PREFIXES)}


def shell_line(argv: list[str], env: dict[str, str] | None = None, raw: tuple[str, ...] = ()) -> str:
    """argv quoted for a shell; words in `raw` are left as they are (shell variables)."""
    words = [w if any(r in w for r in raw) else shlex.quote(w) for w in argv]
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join(prefix + words)


def sbatch_script(launch: Launch, port: int, job_name: str, time: str, partition: str, gpus_per_node: int,
                  cpus_per_task: int, output: str) -> str:
    """One task per node; each runs torchrun, meeting at the first node of the allocation."""
    head = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={launch.nnodes}",
            "#SBATCH --ntasks-per-node=1", f"#SBATCH --output={output}"]
    head += [f"#SBATCH --gpus-per-node={gpus_per_node}"] if gpus_per_node else []
    head += [f"#SBATCH --cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    head += [f"#SBATCH --time={time}"] if time else []
    head += [f"#SBATCH --partition={partition}"] if partition else []
    env = [f"export {k}={shlex.quote(v)}" for k, v in passed_env().items()]
    variables = ("$HEAD_NODE", "$SLURM_JOB_ID", "$SLURM_NNODES")
    command = launch.node_command(endpoint=f"$HEAD_NODE:{port}", run_id="$SLURM_JOB_ID", nnodes="$SLURM_NNODES")
    body = ["set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", *env,
            'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            "# one `loom launch` (one torchrun) per node; c10d rendezvous at the first node, the job id as run id",
            "srun --kill-on-bad-exit=1 " + shell_line(command, raw=variables)]
    return "\n".join(head + [""] + body) + "\n"


def read_hostfile(path: str | Path) -> list[tuple[str, int | None]]:
    """`host [slots=N]` per line (DeepSpeed's format); '#' starts a comment."""
    hosts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        slots = None
        for word in words[1:]:
            key, _, value = word.partition("=")
            if key != "slots" or not value.isdigit():
                raise ValueError(f"{path}:{number}: expected 'host [slots=N]', got {line.strip()!r}")
            slots = int(value)
        hosts.append((words[0], slots))
    if not hosts:
        raise ValueError(f"{path}: no hosts")
    return hosts


def ssh_commands(launch: Launch, hosts: list[str]) -> list[list[str]]:
    """`ssh HOST 'cd CWD && ENV loom launch ... --node-rank=i'` for each host."""
    env = passed_env()
    return [["ssh", host, f"cd {shlex.quote(os.getcwd())} && " +
             shell_line(launch.node_command(launch.rdzv_endpoint, launch.run_id, str(launch.nnodes), i), env)]
            for i, host in enumerate(hosts)]


def run_all(commands: list[list[str]], out_dir: str) -> int:
    """Start every command and wait for all: the worst exit code, or 0 after a SIGTERM that ended in a
    preemption checkpoint (the signal is passed on to the commands still running)."""
    started = time.time()
    procs = [subprocess.Popen(cmd) for cmd in commands]
    with passing_sigterm(procs) as received:
        code = max(p.wait() for p in procs)
    return 0 if code and received and preempted_since(out_dir, started) else code
