"""The device-coherent start: device, process-group backend, DeepSpeed accelerator and attention kernel decided in
one place (common/distributed.plan_device, pretrain/parallel.check_device). CUDA hosts are faked by
`torch.cuda.is_available()` alone."""

import os

import pytest
import torch

from common.config import ConfigError
from common.distributed import DevicePlan, plan_device


@pytest.fixture
def cuda_host(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)


@pytest.fixture
def cpu_host(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)


def test_a_cuda_host_trains_on_cuda_with_nccl_by_default(cuda_host):
    assert plan_device("auto") == DevicePlan("cuda", "nccl", "cuda")
    assert plan_device("nccl") == DevicePlan("cuda", "nccl", "cuda")


def test_gloo_on_a_cuda_host_trains_everything_on_the_cpu(cuda_host):
    assert plan_device("gloo") == DevicePlan("cpu", "gloo", "cpu")


def test_a_cpu_host_trains_with_gloo(cpu_host):
    assert plan_device("auto") == DevicePlan("cpu", "gloo", "cpu")


def test_nccl_without_cuda_is_refused(cpu_host):
    with pytest.raises(ConfigError, match="parallel.backend=nccl needs CUDA.*use parallel.backend=auto or gloo"):
        plan_device("nccl")


def test_a_ds_accelerator_on_the_other_device_is_refused(cuda_host, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(ConfigError, match="DS_ACCELERATOR=cpu contradicts parallel.backend=nccl.*unset DS_ACCELERATOR"):
        plan_device("auto")
    assert plan_device("gloo").accelerator == "cpu"  # agrees with a CPU run


def test_loom_train_hands_the_plan_to_its_workers(cuda_host, monkeypatch):
    from launch.train_commands import use_device_plan
    from pretrain.config import TrainConfig

    cfg = TrainConfig()
    cfg.parallel.backend = "gloo"
    monkeypatch.setenv("DS_ACCELERATOR", "")  # restored after the test
    use_device_plan(cfg)
    assert os.environ["DS_ACCELERATOR"] == "cpu"  # DeepSpeed in the workers puts the engine on the CPU too


def test_a_worker_refuses_deepspeed_on_another_device_and_flex_without_a_backward():
    from pretrain.attention import flex_trains_on, kernel_for
    from pretrain.config import TrainConfig
    from pretrain.parallel import check_device

    cfg = TrainConfig()  # this test process's DeepSpeed accelerator is the CPU
    with pytest.raises(ConfigError, match="DeepSpeed's accelerator is 'cpu' but this process trains on cuda"):
        check_device(cfg, torch.device("cuda", 0))
    check_device(cfg, torch.device("cpu"))  # auto: sdpa here
    assert kernel_for("auto", torch.device("cuda", 0)) == "flex" and kernel_for("auto", torch.device("cpu")) == "sdpa"
    cfg.model.attention = "flex"
    assert not flex_trains_on("cpu")
    with pytest.raises(ConfigError, match="model.attention=flex: FlexAttention .* has no backward on cpu"):
        check_device(cfg, torch.device("cpu"))


def test_the_megatron_shim_follows_the_training_device_not_the_host(cuda_host, monkeypatch):
    """gloo on a CUDA host: megatron's sequence-parallel buffers must land on the CPU as the model does."""
    import megatron.core.tensor_parallel.layers as layers
    import megatron.core.tensor_parallel.mappings as mappings
    import megatron.core.utils as utils

    from pretrain import megatron_cpu

    for module in (layers, mappings, utils):
        monkeypatch.setattr(module, "torch", module.torch)  # restored after the test
    megatron_cpu.apply()
    assert mappings.torch.cuda.current_device() == torch.device("cpu")


@pytest.mark.slow
def test_the_gpu_check_runs_at_toy_size_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py --smoke: every section of the GPU check, through the same code, without errors."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "mutations"), "LOOM_TEST_FLEX_ON_CPU": "1",
           "MASTER_PORT": "29517"}
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 sections" in result.stdout and "0 with errors" in result.stdout
    report = json.loads(out.read_text())
    assert report["flex_vs_dense"]["eager"]["within_1e-5"]
    runs = {k: v for k, v in report["throughput"].items() if isinstance(v, dict)}
    assert set(runs) == {"loom_flex_packed", "loom_sdpa_dense_mask_packed", "loom_sdpa_causal_single_document",
                         "hf_llama_sdpa_single_document"}
    assert all(0 < r["mfu_vs_measured_gemm_peak"] <= 1 for r in runs.values())
    assert report["visual_tokenizer"]["images_per_s"] > 0
