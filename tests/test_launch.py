"""`loom launch`: the torchrun command, the sbatch script, the hostfile form (real launches: tests/test_faults.py)."""

import subprocess

from conftest import REPO, run_loom

DATA = ["data.global_batch_size=16", "data.micro_batch_size=2"]


def launch(world, *args, env=None):
    return run_loom("launch", REPO / "configs" / "tiny.yaml", f"data.sources.shapes.path={world / 'tokens'}", *DATA,
                    *args, env=env)


def test_dry_run_prints_the_torchrun_command_with_the_environment(world):
    result = launch(world, "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint", "node0:29400",
                    "--max-restarts", "3", "--run-id", "exp1", "--dry-run", env={"NCCL_DEBUG": "INFO"})
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    for part in ("NCCL_DEBUG=INFO ", "-m torch.distributed.run --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d "
                 "--rdzv-endpoint=node0:29400 --rdzv-id=exp1 --max-restarts=3 --shutdown-timeout=120 "
                 "-m launch.cli train",
                 "configs/tiny.yaml", "data.micro_batch_size=2"):
        assert part in line, line
    no_endpoint = launch(world, "--nnodes", "2", "--nproc-per-node", "2", "--dry-run")
    assert no_endpoint.returncode != 0 and "--rdzv-endpoint HOST:PORT is needed" in no_endpoint.stderr
    too_big = launch(world, "--nproc-per-node", "16", "--dry-run")  # validated for 16 processes before any start
    assert too_big.returncode != 0 and "data.global_batch_size (16) must be divisible" in too_big.stderr


def test_slurm_script_starts_one_torchrun_per_node(world, tmp_path):
    result = launch(world, "--nnodes", "4", "--nproc-per-node", "2", "--slurm", "--time", "48:00:00",
                    "--partition", "gpu", "--max-restarts", "2", env={"NCCL_SOCKET_IFNAME": "eth0"})
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --time=48:00:00", "#SBATCH --partition=gpu", "export NCCL_SOCKET_IFNAME=eth0",
                 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'):
        assert line in script.splitlines(), line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "-m launch.cli launch" in srun
    assert "data.micro_batch_size=2 --nnodes=$SLURM_NNODES --nproc-per-node=2" in srun
    assert "--rdzv-endpoint=$HEAD_NODE:29500 --run-id=$SLURM_JOB_ID --max-restarts=2 --shutdown-timeout=120" in srun
    (tmp_path / "job.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", tmp_path / "job.sbatch"]).returncode == 0


def test_hostfile_starts_torchrun_on_every_host_over_ssh(world, tmp_path):
    (tmp_path / "hosts").write_text("# cluster\nnode-a slots=2\nnode-b slots=2  # second\n")
    result = launch(world, "--hostfile", tmp_path / "hosts", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [["ssh", "node-a"], ["ssh", "node-b"]]
    for rank, line in enumerate(lines):
        assert "--nnodes=2 --nproc-per-node=2" in line and "--rdzv-endpoint=node-a:29500" in line
        assert f"--node-rank={rank}" in line
    (tmp_path / "uneven").write_text("node-a slots=2\nnode-b slots=4\n")
    uneven = launch(world, "--hostfile", tmp_path / "uneven", "--dry-run")
    assert uneven.returncode != 0 and "different slots" in uneven.stderr
