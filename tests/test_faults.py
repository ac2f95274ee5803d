"""Training through the faults of clusters, each injected for real: a worker SIGKILLed under two torchrun agents
(--nnodes 2, loopback rendezvous), a node lost between two hosts (network namespaces), SIGTERM to every process
or to one rank, a NaN on one rank, a run of loss spikes, a full disk, a filesystem too small to start, a hung
collective, a collective whose peer died. Runs are compared with the uninterrupted reference run (`trained`,
conftest)."""

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

import pytest
import torch

from common.checkpoint_folders import COMPLETE, latest_tag
from common.manifest import verify
from conftest import REPO, run_loom, train_args, train_losses
from launch.cluster import shell_line
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


def descendants(pid: int) -> list[int]:
    return [d for child in children(pid) for d in (child, *descendants(child))]


@pytest.fixture
def two_hosts(tmp_path):
    """Two hosts on this machine: network namespaces joined by a veth pair (10.231.7.1 and .2, traffic only
    between them), each process started in one with its own hostname (node-a, node-b) and an /etc/hosts naming
    both, as a cluster's nodes resolve each other. Returns start(host, *loom_args) -> Popen. Needs root (CI
    runs as root), or CAP_NET_ADMIN and CAP_SYS_ADMIN."""
    tag = f"{os.getpid() % 100000}"
    hosts = {"node-a": (f"loom{tag}a", "10.231.7.1", f"lv{tag}a"),  # namespace, address, veth end
             "node-b": (f"loom{tag}b", "10.231.7.2", f"lv{tag}b")}
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, (_, a, _) in hosts.items()))
    (ns_a, _, dev_a), (ns_b, _, dev_b) = hosts.values()
    setup = [["ip", "netns", "add", ns_a], ["ip", "netns", "add", ns_b],
             ["ip", "link", "add", dev_a, "type", "veth", "peer", "name", dev_b],
             ["ip", "link", "set", dev_a, "netns", ns_a], ["ip", "link", "set", dev_b, "netns", ns_b]]
    for ns, address, dev in hosts.values():
        setup += [["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", dev],
                  ["ip", "-n", ns, "link", "set", dev, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]]
    try:
        for command in setup:
            made = subprocess.run(command, capture_output=True, text=True)
            assert made.returncode == 0, f"cannot make two network namespaces here: {' '.join(command)}: " \
                                         f"{made.stderr.strip()}"

        def start(host: str, *args) -> subprocess.Popen:
            ns = hosts[host][0]
            loom = shell_line([sys.executable, "-m", "launch.cli", *map(str, args)])
            return subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--uts", "--mount", "sh", "-c",
                                     f"mount --bind {hosts_file} /etc/hosts && hostname {host} && exec {loom}"],
                                    cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
        yield start
    finally:
        for ns, _, _ in hosts.values():  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.slow
def test_two_hosts_survive_the_loss_of_a_node(two_hosts, trained, world, tmp_path):
    """`loom launch` on two hosts (distinct addresses and hostnames, rendezvous at node-a); after step 4 node-b
    is lost (its agent and worker SIGKILLed, as a machine that dies); node-a's worker fails in its next
    collective, its agent restarts it (--max-restarts 1) and waits; a replacement node-b joins the same run id;
    the job resumes from step 3's checkpoint and every loss equals the single-node reference run's."""
    out = tmp_path / "run"
    launch = ["launch", *train_args(world, out)[1:], "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint",
              f"node-a:{free_port()}", "--run-id", "two-hosts", "--max-restarts", "1"]
    node_a, node_b = two_hosts("node-a", *launch), two_hosts("node-b", *launch)
    wait_for_step(out, 4, [node_a, node_b])
    for pid in [node_b.pid, *descendants(node_b.pid)]:
        os.kill(pid, signal.SIGKILL)
    node_b.wait(timeout=60)
    lost_at = max(logged_steps(out))
    replacement = two_hosts("node-b", *launch)
    results = collect([node_a, replacement])
    output = "".join(o for _, o in results)
    assert all(code == 0 for code, _ in results), "\n".join(o[-4000:] for _, o in results)
    assert lost_at < 6, "the run ended before the node was lost"
    assert re.search(r"resumed from \S+step_000003 at step 3", output), output[-4000:]
    # node-a's worker learnt of the loss in a collective with node-b's address (PhaseError names phase and step)
    assert re.search(r"rank \d: .+ at step \d failed: .*10\.231\.7\.2", output), output[-4000:]
    assert train_losses(out) == train_losses(trained[0])


def rank_of(pid: int) -> int:
    return int(dict(v.split("=", 1) for v in (Path("/proc") / str(pid) / "environ").read_text().split("\0")
                    if "=" in v)["RANK"])


@pytest.mark.slow
@pytest.mark.parametrize("receivers", ["every process", "rank 1 only"])
def test_sigterm_checkpoints_the_current_step_and_exits_zero(receivers, trained, world, tmp_path):
    """SIGTERM to every process of the job, as SLURM preempts (`loom launch`, torchrun's agent, the workers), or
    to one worker only (the ranks agree at the next step boundary): a checkpoint at the step it interrupts, exit
    0; the same command again resumes there and ends with the reference run's losses."""
    out = tmp_path / "run"
    command = ["launch", *train_args(world, out)[1:], "--nproc-per-node", "2", "--rdzv-endpoint",
               f"127.0.0.1:{free_port()}"]
    job = start_loom(*command)
    wait_for_step(out, 1, [job])
    agent = children(job.pid)
    ranks = {rank_of(pid): pid for pid in children(agent[0])}
    for pid in [job.pid, *agent, *ranks.values()] if receivers == "every process" else [ranks[1]]:
        os.kill(pid, signal.SIGTERM)
    [(code, output)] = collect([job])
    assert code == 0, output[-3000:]
    assert f"preempted ({'SIGTERM' if receivers == 'every process' else 'signal on another rank'}): saved step_" \
        in output
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
    runs out of disk at step 8's checkpoint. The engine's state right after the rollback's load is saved by
    DeepSpeed into out/after_load/loaded (tests/mutations/sitecustomize.py)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    result = run_loom(*train_args(world, out, "schedule.steps=8", "checkpoint.interval=1", "checkpoint.keep_last=10",
                                  "faults.max_skipped_steps=1", "faults.spike_factor=3",
                                  "faults.spike_rollback_after=2"),
                      env={"LOOM_FAULT": "nan:2:1,spike:5:*,spike:6:*,disk_full:8:1",
                           "PYTHONPATH": str(REPO / "tests" / "mutations"),
                           "LOOM_TEST_SAVE_AFTER_LOAD": str(out / "after_load")})
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
    records = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert records[2]["skipped_steps"] == 1 and records[2]["loss"]["total"] != records[2]["loss"]["total"]  # NaN
    # the learning-rate schedule did not advance: from step 2 on, step k trains at the rate of applied step k - 1
    from pretrain.config import load_config
    from pretrain.parallel import lr_lambda

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["data.sources.s.path=x", "schedule.steps=8",
                                                       "schedule.warmup_steps=2"])
    rate = lr_lambda(cfg)
    for step, applied in ((1, 1), (2, 1), (3, 2), (4, 3)):
        assert records[step]["lr"] == pytest.approx(cfg.optimizer.lr * rate(applied), rel=1e-12), step
    assert rate(3) < rate(2)  # so an advanced schedule would show at step 3


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
    # the weights and Adam moments the training continued from are step 4's checkpoint's, bit for bit
    checkpoint = optimizer_tensors(out / "checkpoints" / "step_000004")
    after_load = optimizer_tensors(out / "after_load" / "loaded")
    assert checkpoint.keys() == after_load.keys() and any("optim_states" in k for k in checkpoint)
    assert all(torch.equal(checkpoint[k], after_load[k]) for k in checkpoint)
    assert not all(torch.equal(after_load[k], v) for k, v in optimizer_tensors(out / "checkpoints" /
                                                                               "step_000006").items())


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


def test_refuses_to_start_without_room_for_a_checkpoint(world, tmp_path):
    """out_dir on a real 1 MiB filesystem (a tmpfs in a private mount namespace, made with unshare): every rank
    refuses before training, naming the filesystem's free space."""
    small = tmp_path / "small_disk"
    small.mkdir()
    args = shell_line([sys.executable, "-m", "launch.cli", *map(str, train_args(world, small / "run"))])
    result = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c",
                             f"mount -t tmpfs -o size=1m loom_test {shell_line([str(small)])} && exec {args}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert "mount" not in result.stderr.split("\n")[0], f"could not make a small filesystem: {result.stderr}"
    assert result.returncode != 0
    assert re.search(r"not enough disk for this run's checkpoints: a checkpoint takes \d+\.\d\d GiB \(estimated from "
                     r"the model\), \S+ has 0\.00 GiB free", result.stderr), result.stderr[-3000:]
    assert "step 1/" not in result.stdout
    assert not any(small.iterdir())  # the tmpfs was private to the job: nothing of it is left here


def dies_in_a_collective(rank: int, port: int, said) -> None:
    """Rank 1 exits after a barrier; rank 0 then runs an all-reduce inside a watchdog phase."""
    from datetime import timedelta

    import torch.distributed as dist

    from pretrain.resilience import WATCHDOG, PhaseError, phase

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    dist.barrier()
    if rank == 1:
        os._exit(1)
    time.sleep(1)
    WATCHDOG.rank, WATCHDOG.step = 0, 7
    try:
        with phase("the all-reduce of the test"):
            dist.all_reduce(torch.ones(4))
        said.put("no error")
    except PhaseError as e:
        said.put(f"PhaseError: {e}")


def test_a_collective_whose_peer_died_raises_phase_error_naming_the_phase_and_step():
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    said, port = context.Queue(), free_port()
    ranks = [context.Process(target=dies_in_a_collective, args=(rank, port, said)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    message = said.get(timeout=120)
    for process in ranks:
        process.join(timeout=30)
    assert message.startswith("PhaseError: rank 0: the all-reduce of the test at step 7 failed: "), message
    assert len(message) > len("PhaseError: rank 0: the all-reduce of the test at step 7 failed: ")  # gloo's words


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
