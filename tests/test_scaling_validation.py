"""Scaling laws that must predict: held-out budget validation, sweep design (minimum steps, adaptive isoFLOP
placement) and the bimodal mixed-modal law, each on data from a known law."""

import json

import numpy as np
import pytest
import yaml

from conftest import REPO, run_loom
from analysis.mixed_modal import fit_bimodal, modality_losses
from analysis.scaling_validation import validate_law
from analysis.sweep import load_spec, make_point, place_next_budgets, plan, point_dir
from analysis.sweep_placement import place_depths, predict_n_opt

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28  # Hoffmann et al. 2022's law, the truth


def law(n, d, e=E, a=A, b=B, alpha=ALPHA, beta=BETA):
    return e + a / n ** alpha + b / d ** beta


def isoflop_points(budgets, sizes_per_budget=7, noise=0.003, seed=0, law_of=lambda c: law):
    """(N, D, loss, budget) of isoFLOP curves around each budget's optimum, C = 6 N D."""
    rng = np.random.default_rng(seed)
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    rows = []
    for c in budgets:
        for n in g * (c / 6) ** (BETA / (ALPHA + BETA)) * np.logspace(-1, 1, sizes_per_budget):
            d = c / (6 * n)
            rows.append((n, d, law_of(c)(n, d) * np.exp(rng.normal(0, noise)), c))
    return [np.array(v) for v in zip(*rows)]


def test_a_law_fitted_on_smaller_budgets_predicts_the_largest():
    n, d, loss, budgets = isoflop_points(np.logspace(18, 21, 4))
    report = validate_law(n, d, loss, budgets)
    assert report["passed"] and report["rollout"]["mean_abs_relative_error"] < 0.01
    assert report["rollout"]["held_out_budget"] == 1e21 and report["rollout"]["fitted_on"] == [1e18, 1e19, 1e20]
    assert len(report["leave_one_budget_out"]) == 3
    assert all(r["mean_abs_relative_error"] < 0.02 for r in report["leave_one_budget_out"])
    assert "predicts 1e+21" in report["summary"]
    # a kind with nothing left to predict (Loom's visual-structure tokens reach ~0.001 nats) is not judged
    tiny = validate_law(n, d, loss * 1e-3, budgets)
    assert tiny["passed"] is None and "nothing left to predict" in tiny["summary"]
    # ... even when a point of a smaller budget, a few steps from initialisation, was not yet near zero
    early = np.where(budgets == budgets.min(), loss, loss * 1e-3)
    assert validate_law(n, d, early, budgets)["passed"] is None


def test_a_law_that_changes_between_budgets_is_flagged(tmp_path):
    # the largest budget follows another law (a higher floor): nothing fitted below it can predict it
    def law_of(c):
        return (lambda n, d: law(n, d, e=2.4)) if c == 1e21 else law
    n, d, loss, budgets = isoflop_points(np.logspace(18, 21, 4), law_of=law_of)
    report = validate_law(n, d, loss, budgets)
    assert report["passed"] is False and report["rollout"]["mean_abs_relative_error"] > 0.15
    assert "DOES NOT PREDICT" in report["summary"]

    # the same through `loom sweep fit`: one line says so, --strict fails, the plot is written
    rows = [{"name": f"p{i}", "budget": f"flops={c:.3g}", "steps": 200, "N": a, "N_non_embedding": a, "D": b,
             "C": c, "final_loss": {"total": float(v)}, "eval_loss": {"total": float(v)}}
            for i, (a, b, v, c) in enumerate(zip(n, d, loss, budgets))]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fit = run_loom("sweep", "fit", results, "--bootstrap", "5", "--strict")
    assert fit.returncode == 3, fit.stderr[-2000:]
    assert "DOES NOT PREDICT 1e+21: mean error" in fit.stdout
    report = json.loads((tmp_path / "fit" / "report.json").read_text())
    assert report["kinds"]["total"]["validation"]["passed"] is False
    assert (tmp_path / "fit" / "validation_total.png").read_bytes()[:4] == b"\x89PNG"


def test_points_of_few_steps_are_left_out_of_the_fit(tmp_path):
    n, d, loss, budgets = isoflop_points(np.logspace(18, 20, 3))
    rows = [{"name": f"p{i}", "budget": f"flops={c:.3g}", "steps": 40 if i == 0 else 300, "N": a,
             "N_non_embedding": a, "D": b, "C": c, "final_loss": {"total": float(v)}, "eval_loss": {"total": float(v)}}
            for i, (a, b, v, c) in enumerate(zip(n, d, loss, budgets))]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fit = run_loom("sweep", "fit", results, "--bootstrap", "5")
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert "left out p0: 40 steps < 100" in fit.stdout
    report = json.loads((tmp_path / "fit" / "report.json").read_text())
    assert report["points"] == len(rows) - 1 and report["left_out"] == ["p0: 40 steps < 100"]


def test_sweep_plan_keeps_points_that_train_and_bounds_the_warmup(tmp_path):
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump({
        "base": str(REPO / "configs" / "tiny.yaml"), "out_dir": str(tmp_path / "sweep"),
        "size": {"depths": [1, 2, 3, 4], "aspect": 16, "head_dim": 16}, "flops": [3e10, 1e11]}))
    spec, base = load_spec(spec_path)
    assert spec.min_steps == 100
    points, notes = plan(spec, base, vocab_size=800)
    assert points and all(p.steps >= 100 for p in points)
    assert any("steps < min_steps 100, left out" in note for note in notes)
    for p in points:
        warmup = int(next(o for o in p.overrides if o.startswith("schedule.warmup_steps=")).split("=")[1])
        assert warmup <= 0.1 * p.steps


def test_predicted_optimum_follows_the_minima_of_smaller_budgets():
    n, d, loss, budgets = isoflop_points([1e18, 1e19], noise=0.001)
    rows = [{"budget": c, "N": a, "loss": v} for a, v, c in zip(n, loss, budgets)]
    guess = predict_n_opt(rows, 1e20)
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    truth = g * (1e20 / 6) ** (BETA / (ALPHA + BETA))
    assert all(m["bracketed"] for m in guess["minima"]) and "through 2 minima" in guess["how"]
    assert abs(np.log(guess["N_opt"] / truth)) < np.log(1.3)
    sizes = {k: truth * 2.0 ** (k - 10) for k in range(1, 21)}
    assert place_depths(sizes, guess["N_opt"], 5) == [8, 9, 10, 11, 12]
    assert place_depths(sizes, sizes[1], 5) == [1, 2, 3, 4, 5]  # shifted inwards at the end of the range


def test_adaptive_sweep_places_the_next_budget_around_the_known_optimum(tmp_path):
    """The smallest budget's points 'finish' with losses from a known law of this sweep's N and D; the next
    budget's sizes are then centred on the size that law says is best there."""
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump({
        "base": str(REPO / "configs" / "tiny.yaml"), "out_dir": str(tmp_path / "sweep"),
        "size": {"depths": [1, 2, 3, 4, 5], "aspect": 16, "head_dim": 16}, "flops": [2e11, 2e12],
        "min_steps": 10, "adaptive": {"enabled": True, "sizes": 5, "max_depth": 14}}))
    spec, base = load_spec(spec_path)
    # alpha = beta: N_opt ~ C^0.5, the exponent adaptive placement assumes from a single budget
    truth = dict(e=1.0, a=300.0, b=300.0, alpha=0.3, beta=0.3)
    points, notes = plan(spec, base, vocab_size=800, placement={})
    assert {p.budget for p in points} == {"flops=2e+11"} and any("placed once" in note for note in notes)
    for p in points:
        folder = point_dir(spec, p)
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({
            "steps": p.steps, "final_loss": {"total": 9.0},
            "final_eval_loss": {"total": law(p.params["total"], p.tokens, **truth)}}))
    assert place_next_budgets(spec, base, 800, log=lambda m: None)
    placed = json.loads((tmp_path / "sweep" / "placement.json").read_text())["flops2e12"]["depths"]
    candidates = [make_point(spec, base, 800, "flops", 2e12, depth)[0] for depth in range(1, 15)]
    best = min((p for p in candidates if p), key=lambda p: law(p.params["total"], p.tokens, **truth))
    assert len(placed) == 5 and placed[0] < best.depth < placed[-1], (placed, best.depth)
    assert not place_next_budgets(spec, base, 800, log=lambda m: None)  # nothing left to place
    points, notes = plan(spec, base, 800, json.loads((tmp_path / "sweep" / "placement.json").read_text()))
    assert sorted(p.depth for p in points if p.budget == "flops=2e+12") == placed


UNIMODAL = {"text": dict(e=1.8, a=400.0, b=410.0, alpha=0.34, beta=0.28),
            "image": dict(e=2.5, a=900.0, b=300.0, alpha=0.40, beta=0.25)}
INTERACTION = {"C": 0.15, "A": 30.0, "alpha": 0.30, "B": 80.0, "beta": 0.30}


def test_bimodal_law_recovers_known_interaction_parameters():
    rng = np.random.default_rng(0)
    rows = []
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        for n in np.logspace(6, 10, 6):
            for d in np.logspace(8, 12, 6):
                text, image = law(n, d, **UNIMODAL["text"]), law(n, d, **UNIMODAL["image"])
                if 0 < share < 1:
                    f = INTERACTION
                    mixed = (law(n, d * (1 - share), **UNIMODAL["text"]) + law(n, d * share, **UNIMODAL["image"])) / 2 \
                        - f["C"] + f["A"] / n ** f["alpha"] + f["B"] / d ** f["beta"]
                    text = image = mixed  # the mean of the two is what the law describes
                losses = {k: float(v * np.exp(rng.normal(0, 5e-4))) for k, v in (("text", text), ("image", image))}
                rows.append({"N": n, "D": d, "image_share": share, "eval_loss": losses, "final_loss": losses})
    fit = fit_bimodal(rows)
    for key, value in INTERACTION.items():
        assert abs(fit["interaction"][key] / value - 1) < 0.10, (key, fit["interaction"][key], value)
    assert abs(fit["unimodal"]["i"]["alpha"] / 0.34 - 1) < 0.05 and abs(fit["unimodal"]["j"]["alpha"] / 0.40 - 1) < 0.05
    assert fit["mean_abs_relative_error"] < 0.002


def test_each_modality_is_measured_on_the_held_out_source_where_it_is_the_data():
    by_source = {"text": {"loss": {"total": 2.0, "text": 2.0}, "tokens": {"text": 1000}},
                 "images": {"loss": {"total": 1.5, "text": 3.1, "image": 1.4}, "tokens": {"text": 80, "image": 900}}}
    row = {"eval_loss": {"total": 1.7, "text": 2.4, "image": 1.4}, "eval_by_source": by_source, "final_loss": {}}
    # text on text documents (not captions), image on image documents, the total on the configured mix
    assert modality_losses(row) == {"total": 1.7, "text": 2.0, "image": 1.4}
    assert modality_losses({"eval_loss": {"total": 1.7, "text": 2.4}, "final_loss": {}}) == {"total": 1.7, "text": 2.4}


def test_bimodal_law_needs_unimodal_and_mixed_runs():
    rows = [{"N": 1e7, "D": 1e9, "image_share": 0.5, "eval_loss": {"text": 2.0, "image": 3.0}}]
    with pytest.raises(ValueError, match="image share 0"):
        fit_bimodal(rows)


def test_a_loss_that_does_not_fall_with_data_has_no_optimal_allocation_but_still_fits(tmp_path):
    """A kind a mixture never trains on (the image loss of a text-only run) fits to beta ~ 0; the fit reports
    that instead of dividing by zero, and `loom sweep fit --budget` still writes its report."""
    from analysis.scaling import FitError, optimal_allocation

    with pytest.raises(FitError, match="does not fall with both N and D"):
        optimal_allocation({"E": 1.0, "A": 10.0, "alpha": 0.3, "B": 5.0, "beta": 0.0}, 1e20)
    n, d, loss, budgets = isoflop_points(np.logspace(18, 20, 3))
    flat = law(n, d, b=0.0)  # no dependence on D at all
    rows = [{"name": f"p{i}", "budget": f"flops={c:.3g}", "steps": 200, "N": a, "N_non_embedding": a, "D": b,
             "C": c, "final_loss": {"total": float(v)}, "eval_loss": {"total": float(v)}}
            for i, (a, b, v, c) in enumerate(zip(n, d, flat, budgets))]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fit = run_loom("sweep", "fit", results, "--bootstrap", "5", "--budget", "1e21")
    assert fit.returncode == 0, fit.stderr[-2000:]
    report = json.loads((tmp_path / "fit" / "report.json").read_text())
    fitted = report["kinds"]["total"]["approach3"]
    assert fitted["B"] / d.min() ** fitted["beta"] < 1e-3  # the fit found no dependence on D
