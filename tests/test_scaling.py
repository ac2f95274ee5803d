"""Scaling-law sweeps and fits: recovery of known laws, clear errors, and a real resumable sweep."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, run_loom
from common.config import ConfigError, build, load_tree
from pretrain.config import TrainConfig, validate
from analysis.scaling import FitError, fit_approach2, fit_approach3, optimal_allocation
from analysis.sweep import load_spec, plan, run_sweep

# Hoffmann et al. 2022's fitted law, used as the truth
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
N_EXPONENT = BETA / (ALPHA + BETA)


def law(n, d):
    return E + A / n ** ALPHA + B / d ** BETA


def test_approach3_recovers_a_known_law_from_noisy_losses():
    rng = np.random.default_rng(0)
    n, d = (g.ravel() for g in np.meshgrid(np.logspace(7, 10, 8), np.logspace(9, 12, 8)))
    fit = fit_approach3(n, d, law(n, d) * np.exp(rng.normal(0, 0.005, n.size)), bootstrap=20)
    assert abs(fit["alpha"] / ALPHA - 1) <= 0.05 and abs(fit["beta"] / BETA - 1) <= 0.05
    assert abs(fit["E"] / E - 1) <= 0.02
    assert abs(fit["n_exponent"] - N_EXPONENT) <= 0.03
    assert fit["ci95"]["alpha"][0] <= fit["alpha"] <= fit["ci95"]["alpha"][1]
    # the compute-optimal size the fit gives, against the truth's: G (C/6)^(beta/(alpha+beta))
    truth = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA)) * (1e21 / 6) ** N_EXPONENT
    assert abs(np.log(optimal_allocation(fit, 1e21)["N"] / truth)) < np.log(1.25)


def test_approach2_recovers_the_optimal_size_exponent():
    rng = np.random.default_rng(1)
    budgets, sizes, losses = [], [], []
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    for c in np.logspace(18, 21, 5):
        for n in g * (c / 6) ** N_EXPONENT * np.logspace(-1, 1, 9):
            budgets.append(c)
            sizes.append(n)
            losses.append(law(n, c / (6 * n)) * np.exp(rng.normal(0, 0.003)))
    fit = fit_approach2(budgets, sizes, losses)
    assert abs(fit["n_exponent"] - N_EXPONENT) <= 0.03
    assert abs(fit["d_exponent"] - ALPHA / (ALPHA + BETA)) <= 0.03
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    for m in fit["budgets"]:  # each parabola's minimum lies near the truth's optimum of its budget
        assert abs(np.log(m["N_opt"] / (g * (m["budget_flops"] / 6) ** N_EXPONENT))) < np.log(1.25)


def test_one_model_size_is_refused_clearly(tmp_path):
    with pytest.raises(FitError, match="at least 3 model sizes"):
        fit_approach3([1e8] * 4, [1e9, 2e9, 4e9, 8e9], [3.0, 2.9, 2.8, 2.7])
    spec = tmp_path / "one.yaml"
    spec.write_text(yaml.safe_dump({"base": str(REPO / "configs" / "tiny.yaml"), "size": {"depths": [2]},
                                    "tokens": [1e5]}))
    with pytest.raises(ConfigError, match="needs at least 3 model sizes"):
        load_spec(spec)
    result = run_loom("sweep", "run", spec)
    assert result.returncode != 0 and "needs at least 3 model sizes" in result.stderr


@pytest.mark.parametrize("name", ["cpu", "cpu_predict", "cpu_glyphs", "gpu", "cpu_mixture", "cpu_kinds"])
def test_sweep_recipes_plan_valid_runs(name):
    spec, base = load_spec(REPO / "configs" / "sweeps" / f"{name}.yaml")
    points, notes = plan(spec, base, vocab_size=65536 if name == "gpu" else 1040)
    # an adaptive sweep plans its smallest budget; the others wait for its results
    budgets = 1 if spec.adaptive.enabled else len(spec.flops)
    assert len({p.budget for p in points}) == budgets and len({p.mixture for p in points}) == max(len(spec.mixtures), 1)
    assert len(points) >= 3 * budgets and len({p.depth for p in points}) >= 3
    assert all(p.steps >= spec.min_steps >= 100 for p in points)
    for p in points:
        cfg = build(TrainConfig, load_tree(base, p.overrides))
        validate(cfg, cfg.parallel.nproc_per_node)
        assert cfg.schedule.warmup_steps <= spec.max_warmup_fraction * p.steps
        budget = float(p.budget.split("=")[1])
        assert abs(p.flops_per_token * p.tokens / budget - 1) < 0.2  # D = C / F(N), up to whole steps
    if name == "gpu":
        sizes = sorted({p.params["total"] for p in points})
        assert 3e7 < sizes[0] and sizes[-1] < 2e9


def tiny_spec(world, out: Path) -> Path:
    spec = out / "sweep.yaml"
    spec.write_text(yaml.safe_dump({
        "base": str(REPO / "configs" / "tiny.yaml"), "out_dir": str(out / "sweep"),
        "overrides": [f"data.sources.shapes.path={world / 'tokens'}",
                      f"eval.sources.shapes.path={world / 'heldout_tokens'}", "eval.sequences=8",
                      "parallel.nproc_per_node=1", "logging.interval=20"],
        "size": {"depths": [1, 2, 3], "aspect": 32, "head_dim": 16, "lr": 3e-3, "lr_ref_dim": 64},
        "flops": [1.2e10, 2.5e10], "min_steps": 4}))
    return spec


@pytest.mark.slow
def test_a_real_sweep_runs_resumes_and_fits(world, tmp_path):
    spec_path = tiny_spec(world, tmp_path)
    spec, base = load_spec(spec_path)
    points, _ = plan(spec, base, vocab_size=_vocab(world))
    assert len(points) == 6
    longest = max(points, key=lambda p: p.steps)
    assert points.index(longest) == 3 and all(p.steps < longest.steps for p in points[:3])

    assert run_sweep(spec_path, "print", log=lambda m: None)["points"] == 6
    run_sweep(spec_path, "slurm", log=lambda m: None)
    sbatch = (tmp_path / "sweep" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-5" in sbatch and sbatch.count("loom train") == 6

    # the 4th point's process dies in its final save: the sweep stops there
    killed = run_loom("sweep", "run", spec_path, env={"LOOM_FAULT": f"save:{longest.steps}:0"}, timeout=1200)
    assert killed.returncode != 0 and f"sweep point {longest.name} failed" in killed.stderr
    resumed = run_loom("sweep", "run", spec_path, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert resumed.stdout.count("already finished, skipped") == 3
    log = (tmp_path / "sweep" / "points" / longest.name / "train.log").read_text()
    assert "resumed from" in log and f"at step {math.ceil(longest.steps / 2)}" in log

    rows = [json.loads(line) for line in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["eval_loss"]["total"] > 0 and r["wall_seconds"] > 0 for r in rows)
    assert {"N", "N_non_embedding", "D", "C"} <= set(rows[0])
    assert (tmp_path / "sweep" / "results.csv").read_text().count("\n") == 7

    fit = run_loom("sweep", "fit", tmp_path / "sweep" / "results.jsonl", "--budget", "1e12", "--bootstrap", "10",
                   "--min-steps", "4")
    assert fit.returncode == 0, fit.stderr[-2000:]
    report = json.loads((tmp_path / "sweep" / "fit" / "report.json").read_text())
    assert {"total", "text", "image"} <= set(report["kinds"])
    total = report["kinds"]["total"]
    assert total["approach3"]["alpha"] >= 0 and total["optimal"]["N"] > 0 and "approach2" in total
    for path in total["plots"]:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(total["plots"]) == 4  # with the held-out budget's predicted vs observed
    validation = total["validation"]
    assert validation["rollout"]["held_out_budget"] == 2.5e10 and len(validation["rollout"]["points"]) == 3
    assert "the law fitted on 1.2e+10" in fit.stdout


def _vocab(world) -> int:
    from data_pipeline.vocab import Vocabulary

    return Vocabulary.from_dict(json.loads((world / "tokens" / "vocab.json").read_text())["layout"]).size
