"""Training through the faults of clusters, each injected for real: a worker SIGKILLed under two torchrun agents
(--nnodes 2, loopback rendezvous), SIGTERM, a NaN on one rank, a run of loss spikes, a full disk, a hung
collective. Runs are compared with the uninterrupted reference run (`trained`, conftest)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.checkpoint_folders import COMPLETE, latest_tag
from common.manifest import verify
from conftest import REPO, run_loom, train_args, train_losses
from common.metrics import read_metrics


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def workers(loom_pid: int) -> list[int]:
    """The training processes under `loom train|launch` -> torchrun agent -> workers."""
    return [w for agent in children(loom_pid) for w in children(agent)]


def start_loom(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def logged_steps(out: Path) -> list[int]:
    """Steps in metrics.jsonl so far (complete lines only: rank 0 may be writing one)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def wait_for_step(out: Path, step: int, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s >= step for s in logged_steps(out)):
            return
        assert all(p.poll() is None for p in procs), "the run ended before the fault could be injected"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def collect(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Wait for every process, reading their output concurrently (a full pipe would block them)."""
    outputs = [None] * len(procs)

    def read(i):
        outputs[i] = procs[i].stdout.read()
    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(procs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return [(p.wait(timeout=60), out) for p, out in zip(procs, outputs)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_agents_train_like_one_node_and_survive_a_killed_worker(trained, world, tmp_path):
    """Two torchrun agents (--nnodes 2, one process each) meet at a loopback c10d rendezvous; a worker of the
    first is SIGKILLed after step 4; both agents restart their workers (--max-restarts 1), which resume from step
    3's checkpoint (6's if the kill came during the last save); every loss equals the single-node reference run
    of the same layout."""
    out, port = tmp_path / "run", free_port()
    launch = ["launch", *train_args(world, out)[1:], "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint",
              f"127.0.0.1:{port}", "--run-id", "two-agents", "--max-restarts", "1"]
    agents = [start_loom(*launch, env={"OMP_NUM_THREADS": "1"}) for _ in range(2)]
    wait_for_step(out, 4, agents)
    [victim] = workers(agents[0].pid)
    os.kill(victim, signal.SIGKILL)
    results = collect(agents)
    assert all(code == 0 for code, _ in results), "\n".join(o[-3000:] for _, o in results)
    assert re.search(r"resumed from \S+step_00000([36]) at step \1", "".join(o for _, o in results))
    assert train_losses(out) == train_losses(trained[0])
    assert [r["step"] for r in read_metrics(out) if "eval_loss" in r] == [0, 6]


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits_zero(trained, world, tmp_path):
    """SIGTERM to every process of the job, as SLURM preempts (`loom launch`, torchrun's agent, the workers): a
    checkpoint at the step it interrupts, exit 0; the same command again resumes there and ends with the
    reference run's losses."""
    out = tmp_path / "run"
    command = ["launch", *train_args(world, out)[1:], "--nproc-per-node", "2", "--rdzv-endpoint",
               f"127.0.0.1:{free_port()}"]
    job = start_loom(*command)
    wait_for_step(out, 1, [job])
    agent = children(job.pid)
    for pid in [job.pid, *agent, *children(agent[0])]:
        os.kill(pid, signal.SIGTERM)
    [(code, output)] = collect([job])
    assert code == 0, output[-3000:]
    assert "preempted (SIGTERM): saved step_" in output
    step = json.loads((out / "summary.json").read_text())["steps"]
    assert 0 < step < 6 and latest_tag(out) == f"step_{step:06d}"
    (out / "checkpoints" / f"step_{step + 1:06d}").mkdir()  # a save that never completed: ignored
    [(code, output)] = collect([start_loom(*command[:-1], f"127.0.0.1:{free_port()}")])
    assert code == 0, output[-3000:]
    assert f"step_{step:06d} at step {step}" in output
    assert train_losses(out) == train_losses(trained[0])  # losses and grad norms, exactly


@pytest.fixture(scope="module")
def faulty(world, tmp_path_factory):
    """8 steps, a checkpoint every step: rank 1's loss is NaN at step 2, global batches 5 and 6 spike, and rank 1
    runs out of disk at step 8's checkpoint."""
    out = tmp_path_factory.mktemp("faults") / "run"
    result = run_loom(*train_args(world, out, "schedule.steps=8", "checkpoint.interval=1", "checkpoint.keep_last=10",
                                  "faults.max_skipped_steps=1", "faults.spike_factor=3",
                                  "faults.spike_rollback_after=2"),
                      env={"LOOM_FAULT": "nan:2:1,spike:5:*,spike:6:*,disk_full:8:1"})
    return out, result


def optimizer_tensors(folder: Path) -> dict:
    """Every tensor of a DeepSpeed checkpoint (model and each rank's optimizer states), by file and key."""
    found = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            found[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
    for path in sorted(folder.glob("*.pt")):
        if not path.name.startswith("loom_rank"):
            walk(path.name, torch.load(path, weights_only=False, map_location="cpu"))
    return found


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_by_every_rank(faulty):
    out, result = faulty
    assert "step 2: non-finite loss on rank 1: the update was skipped on every rank (1/1" in result.stdout
    root = out / "checkpoints"
    before, after, next_step = (optimizer_tensors(root / f"step_00000{i}") for i in (1, 2, 3))
    assert before.keys() == after.keys() and any("optim_states" in k for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and Adam moments of both ranks
    assert not all(torch.equal(after[k], next_step[k]) for k in after)
    record = {r["step"]: r for r in read_metrics(out) if "loss" in r}[2]
    assert record["skipped_steps"] == 1 and record["loss"]["total"] != record["loss"]["total"]  # NaN


@pytest.mark.slow
def test_loss_spikes_roll_back_and_skip_their_batches(faulty):
    out, result = faulty
    assert "step 5: loss spike" in result.stdout and "step 6: loss spike" in result.stdout
    assert "rolled back to step_000004 (step 4); global batches 5-6 will be skipped" in result.stdout
    state = json.loads((out / "checkpoints" / "step_000007" / "loom_state.json").read_text())
    assert state["step"] == 7 and state["batches"] == 9 and state["skipped_batches"] == [[5, 6]]
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, 9))  # the spiking steps 5 and 6 were trained again, on batches 7 and 8
    assert all(r["loss"]["total"] < 10 for r in read_metrics(out) if "loss" in r and r["step"] != 2)


@pytest.mark.slow
def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(faulty):
    out, result = faulty
    assert result.returncode != 0
    assert "LOOM_FAULT: rank 1 may write only 64 KiB per file from step 8" in result.stdout
    assert f"saving {out / 'checkpoints' / 'step_000008'} failed (rank 1: " in result.stderr
    assert "The previous checkpoint step_000007 and latest are left as they were" in result.stderr
    assert latest_tag(out) == "step_000007" and not (out / "checkpoints" / "step_000008").exists()
    verify(out / "checkpoints" / "step_000007")
    assert (out / "checkpoints" / "step_000007" / COMPLETE).exists()


@pytest.mark.slow
def test_a_hung_collective_ends_every_rank_within_the_timeout(world, tmp_path):
    start = time.time()
    result = run_loom(*train_args(world, tmp_path / "run", "faults.step_timeout_s=4", "eval.sources={}"),
                      env={"LOOM_FAULT": "hang:2:1"})
    elapsed = time.time() - start
    assert result.returncode != 0 and elapsed < 120
    output = result.stdout + result.stderr
    assert "LOOM_FAULT: rank 1 hangs at step 2" in output
    for rank in (0, 1):
        assert f"rank {rank}: no progress for " in output
    assert "in the data-parallel all-reduce of the batch's loss-token count at step 2" in output
    stuck = [float(line.split("no progress for ")[1].split(" s")[0]) for line in output.splitlines()
             if "no progress for " in line]
    assert all(4 <= s < 4 + 5 for s in stuck)


def test_refuses_to_start_without_room_for_a_checkpoint(groups, tmp_path, monkeypatch):
    from common.checkpoint_folders import CheckpointError
    from pretrain import checkpointing
    from pretrain.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["data.sources.s.path=x", "model.vocab_size=1000"])
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: SimpleNamespace(total=10 ** 9, free=1000))
    with pytest.raises(CheckpointError, match=r"not enough disk for this run's checkpoints: a checkpoint takes .* GiB "
                                              r"\(estimated from the model\), .* has 0.00 GiB free"):
        checkpointing.ensure_space(tmp_path, cfg, "this run's checkpoints")


def test_too_many_non_finite_steps_stop_naming_the_step_and_rank(groups):
    from pretrain.config import FaultsConfig
    from pretrain.resilience import TrainingError, check_step
    from pretrain.train_state import TrainState

    class SkippingEngine:
        def was_step_applied(self):
            return False
    state, said = TrainState(step=7), []
    nan_sums = torch.tensor([[float("nan")] * 5, [1.0] * 5])
    assert not check_step(SkippingEngine(), nan_sums, True, state, FaultsConfig(max_skipped_steps=1),
                          torch.device("cpu"), said.append)
    assert said == ["step 7: non-finite loss on rank 0: the update was skipped on every rank (1/1 skipped steps "
                    "allowed)"]
    state.step = 9
    with pytest.raises(TrainingError, match=r"step 9: non-finite loss on rank 0; 2 steps skipped in this run, more "
                                            r"than faults.max_skipped_steps=1: stopping"):
        check_step(SkippingEngine(), nan_sums, True, state, FaultsConfig(max_skipped_steps=1), torch.device("cpu"),
                   said.append)
