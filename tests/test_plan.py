"""`loom plan`: layout checks, parameter and FLOP counts, the memory model against measured runs, the cluster
recipes (configs/cluster/*.yaml) with the layouts docs/cluster.md shows."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO
from pretrain.config import load_config
from pretrain.flops import flops_per_token

CLUSTER = {"emu3_7b.yaml": 64, "chameleon_34b.yaml": 256}  # recipe: GPUs of its docs/cluster.md example


def run_loom(*args) -> SimpleNamespace:
    """`loom ARGS` in this process (the plan needs no torch.distributed): returncode, stdout, stderr."""
    from launch.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        code = main([str(a) for a in args])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.mark.slow
def test_memory_model_is_within_25_percent_of_measured_peaks(tmp_path):
    """Four sizes (8M-25M parameters; sequence 256-1024; micro-batch 2-8; no, full and attention-only
    activation checkpointing) and one row of 2048 and 4096 tokens (the dense mask's s^2 term) trained for real on
    this CPU in one process; then every term a cluster plan turns on, each in a 2-process job, every rank
    against the plan for its pipeline stage: TP2, sequence parallelism, ZeRO-2 and ZeRO-3 over DP2, PP2 with
    1, 2 and 4 micro-batches per step, bf16."""
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, REPO / "benchmarks" / "plan_memory.py", "--json", out], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    import runpy

    benchmark = runpy.run_path(str(REPO / "benchmarks" / "plan_memory.py"), run_name="plan_memory")
    CASES, LAYOUTS = benchmark["CASES"], benchmark["LAYOUTS"]
    assert sorted({r["case"] for r in rows}) == sorted([*CASES, *LAYOUTS])
    assert all(len([r for r in rows if r["case"] == name]) == 2 for name in LAYOUTS)  # a row per rank
    assert {r["stage"] for r in rows if r["case"].startswith("pp2")} == {0, 1}
    for row in rows:
        assert row["measured_gib"] > 0.25 and 0.75 <= row["ratio"] <= 1.25, row


def test_parameter_count_is_the_real_models(groups):
    import torch  # noqa: F401  (megatron's layers below)

    from pretrain.parallel import tensor_parallel_of
    from pretrain.model import Transformer
    from analysis.plan import stage_memory

    for preset in ("emu3", "chameleon"):
        cfg = load_config(REPO / "configs" / "tiny.yaml", ["data.sources.s.path=x", "model.vocab_size=700",
                                                          f"model.preset={preset}"])
        model = Transformer(cfg.model, tensor_parallel_of(cfg), 0)
        assert stage_memory(cfg, 1, 0, 1, 0).params == sum(p.numel() for p in model.parameters())


def test_context_parallelism_splits_activations_and_shares_zero_partitions():
    """Rows of 32k tokens on 16 GPUs: CP 4 holds a quarter of each row's activations (plus the gathered keys and
    values) and partitions ZeRO over data x context ranks, so the optimizer states per GPU do not change."""
    recipe = REPO / "configs" / "cluster" / "emu3_7b.yaml"
    reports = {cp: json.loads(run_loom("plan", recipe, "data.seq_len=32768", "data.global_batch_size=16",
                                       f"parallel.cp={cp}", "--gpus", 16, "--json").stdout) for cp in (1, 4)}
    one, four = reports[1], reports[4]
    assert (one["layout"]["dp"], four["layout"]["dp"]) == (8, 2) and four["layout"]["cp"] == 4
    assert four["memory_gib"]["optimizer"] == pytest.approx(one["memory_gib"]["optimizer"])
    assert one["memory_gib"]["activations"] / 4.2 < four["memory_gib"]["activations"] < \
        one["memory_gib"]["activations"] / 3
    assert four["memory_gib"]["logits"] == pytest.approx(one["memory_gib"]["logits"] / 4)


@pytest.mark.parametrize("recipe", sorted(CLUSTER))
def test_cluster_recipes_plan_and_fit(recipe):
    gpus = CLUSTER[recipe]
    result = run_loom("plan", REPO / "configs" / "cluster" / recipe, "--gpus", gpus, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    cfg = load_config(REPO / "configs" / "cluster" / recipe, world_size=gpus)
    layout = report["layout"]
    assert layout["tp"] * layout["pp"] * layout["dp"] == gpus and report["memory_gib"]["fits"]
    assert report["flops_per_token"] == flops_per_token(cfg.model, cfg.data.seq_len)
    assert report["throughput"]["tokens_per_s"] == pytest.approx(gpus * 989e12 * 0.45 / report["flops_per_token"])
    assert report["training"]["days"] == pytest.approx(1e12 / report["throughput"]["tokens_per_s"] / 86400)
    assert report["largest_micro_batch"] >= cfg.data.micro_batch_size
    mem = report["memory_gib"]
    persistent = sum(mem[k] for k in ("weights", "optimizer", "pipeline_outputs", "reserve"))
    persistent += mem["gradients"] if mem["zero3"] else 0
    assert mem["forward_backward"] >= mem["activations"] + mem["logits"]
    assert mem["total"] == pytest.approx(persistent + max(mem["forward_backward"], mem["step"]))
    assert mem["activations_with_full_checkpointing"] < mem["activations_without_checkpointing"]
    expected_params = {"emu3_7b.yaml": 8.49e9, "chameleon_34b.yaml": 34.3e9}[recipe]
    assert report["parameters"]["total"] == pytest.approx(expected_params, rel=0.01)
    table = run_loom("plan", REPO / "configs" / "cluster" / recipe, "--gpus", gpus)
    assert table.returncode == 0 and "fits" in table.stdout and "GPU-hours" in table.stdout


def test_plan_refuses_bad_layouts_and_says_what_does_not_fit():
    recipe = REPO / "configs" / "cluster" / "chameleon_34b.yaml"
    uneven = run_loom("plan", recipe, "--gpus", "100")
    assert uneven.returncode == 1 and \
        "world size 100 is not divisible by parallel.tp x parallel.cp x parallel.pp" in uneven.stderr
    zero = run_loom("plan", recipe, "parallel.zero_stage=2", "--gpus", "256")
    assert zero.returncode == 1 and "DeepSpeed's pipeline engine supports ZeRO 1 only" in zero.stderr
    padding = run_loom("plan", recipe, "model.vocab_pad_multiple=100", "--gpus", "256")
    assert padding.returncode == 1
    assert "model.vocab_pad_multiple (100) must be divisible by parallel.tp" in padding.stderr
    small = run_loom("plan", recipe, "--gpus", "256", "--gpu-memory", "24GB")
    assert small.returncode == 1 and "DOES NOT FIT" in small.stdout
    one_gpu = run_loom("plan", REPO / "configs" / "cluster" / "emu3_7b.yaml", "parallel.tp=1", "--gpus", "1")
    assert one_gpu.returncode == 1 and "none fits" in one_gpu.stdout
    no_vocab = run_loom("plan", REPO / "configs" / "tiny.yaml", "data.sources.s.path=/nowhere", "--gpus", "2")
    assert no_vocab.returncode == 1 and "model.vocab_size is 0" in no_vocab.stderr


def test_recipes_of_the_cluster_folder_are_all_planned():
    assert sorted(p.name for p in (REPO / "configs" / "cluster").glob("*.yaml")) == sorted(CLUSTER)
    assert all(Path(REPO / "configs" / "cluster" / r).read_text().startswith("#") for r in CLUSTER)
