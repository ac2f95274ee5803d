"""`loom sweep fit`: every loss kind of a sweep's results fitted (analysis/scaling.py), validated on held-out
budgets (analysis/scaling_validation.py), plotted (analysis/scaling_plots.py) and written to report.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .mixed_modal import fit_bimodal, modality_losses
from .scaling import FitError, fit_approach2, fit_approach3, optimal_allocation
from .scaling_plots import plot_kind
from .scaling_validation import DEFAULT_KIND_THRESHOLD, DEFAULT_THRESHOLD, validate_law


def load_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FitError(f"results not found: {path} (written by `loom sweep run` or `loom sweep collect`)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise FitError(f"{path} has no finished points")
    return rows


def budget_value(budget: str) -> float:
    """The number of a results row's budget ("flops=1e+12" -> 1e12)."""
    return float(budget.split("=")[1])


def losses(row: dict) -> tuple[dict, str]:
    """The held-out loss per kind (each modality on its own documents where the run evaluated its sources one by
    one) where the run evaluated, else the final training loss."""
    return (modality_losses(row), "eval") if row.get("eval_loss") else (row["final_loss"], "train")


def trained_rows(rows: list[dict], min_steps: int, log=print) -> tuple[list[dict], list[str]]:
    """The rows of points that trained at least `min_steps` steps; the others are listed and left out (a point of
    a few steps measures the optimizer's first steps, not a model size)."""
    left_out = [f"{r['name']}: {r['steps']} steps < {min_steps}" for r in rows if r["steps"] < min_steps]
    for note in left_out:
        log(f"sweep fit: left out {note}")
    kept = [r for r in rows if r["steps"] >= min_steps]
    if not kept:
        raise FitError(f"no point trained {min_steps} steps or more (lower --min-steps to fit them anyway)")
    return kept, left_out


def fit_sweep(results: str | Path, out: str | Path, budget: float | None = None, params: str = "N",
              bootstrap: int = 100, min_steps: int = 100, threshold: float = DEFAULT_THRESHOLD,
              kind_threshold: float = DEFAULT_KIND_THRESHOLD, log=print) -> dict:
    """Fit and validate every loss kind of a results table (per mixture where the sweep has a mixture axis, plus
    the bimodal law across mixtures); writes report.json and PNG plots into `out`. The total loss's law must
    predict within `threshold`, each single kind's within `kind_threshold`."""
    rows, left_out = trained_rows(load_results(results), min_steps, log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"results": str(results), "points": len(rows), "params": params, "min_steps": min_steps,
              "left_out": left_out, "loss_source": sorted({losses(r)[1] for r in rows})}
    mixtures = sorted({r.get("mixture") or "" for r in rows})
    if mixtures == [""]:
        report["kinds"] = fit_kinds(rows, out, "", budget, params, bootstrap, (threshold, kind_threshold), log)
    else:
        report["mixtures"] = {m: {"image_share": next(r.get("image_share") for r in rows if r.get("mixture") == m),
                                  "kinds": fit_kinds([r for r in rows if r.get("mixture") == m], out, m, budget,
                                                     params, bootstrap, (threshold, kind_threshold), log)}
                              for m in mixtures}
        try:
            report["bimodal"] = fit_bimodal(rows, params=params)
            f = report["bimodal"]["interaction"]
            log(f"sweep fit [bimodal text-image]: C {f['C']:.3f} A {f['A']:.3g} alpha {f['alpha']:.3f} "
                f"B {f['B']:.3g} beta {f['beta']:.3f}; fits the mixed runs within "
                f"{report['bimodal']['mean_abs_relative_error']:.1%} (mean)")
        except FitError as e:
            report["bimodal"] = {"error": str(e)}
            log(f"sweep fit [bimodal]: not fitted: {e}")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log(f"sweep fit: {len(rows)} points, {len(mixtures)} mixture(s) -> {out / 'report.json'}")
    return report


def fit_kinds(rows: list[dict], out: Path, mixture: str, budget: float | None, params: str, bootstrap: int,
              thresholds: tuple[float, float], log=print) -> dict:
    """Approach 3 (with validation on held-out budgets, within thresholds = (total's, each other kind's)) and
    approach 2 per loss kind of one mixture's rows."""
    kinds = sorted(set.intersection(*(set(losses(r)[0]) for r in rows)))
    n = np.array([r[params] for r in rows], dtype=np.float64)
    d = np.array([r["D"] for r in rows], dtype=np.float64)
    isoflop = [r["budget"].startswith("flops=") for r in rows]
    budget_values = np.array([budget_value(r["budget"]) for r in rows])
    budgets = np.where(isoflop, budget_values, np.nan)
    fitted = {}
    for kind in kinds:
        name = f"{mixture}/{kind}" if mixture else kind
        loss = np.array([losses(r)[0][kind] for r in rows])
        try:
            entry = {"approach3": fit_approach3(n, d, loss, bootstrap),
                     "validation": validate_law(n, d, loss, budget_values,
                                                thresholds[0] if kind == "total" else thresholds[1])}
        except FitError as e:
            fitted[kind] = {"error": str(e)}
            log(f"sweep fit [{name}]: not fitted: {e}")
            continue
        if all(isoflop):
            try:
                entry["approach2"] = fit_approach2(budgets, n, loss)
            except FitError as e:
                entry["approach2"] = {"error": str(e)}
        if budget:
            try:
                entry["optimal"] = optimal_allocation(entry["approach3"], budget)
            except FitError as e:
                entry["optimal"] = {"error": str(e)}
        entry["plots"] = plot_kind(out, name.replace("/", "_"), rows, n, d, loss, entry,
                                   budgets if all(isoflop) else None)
        fitted[kind] = entry
        f = entry["approach3"]
        log(f"sweep fit [{name}]: E {f['E']:.3f} A {f['A']:.3g} alpha {f['alpha']:.3f} B {f['B']:.3g} "
            f"beta {f['beta']:.3f}; N_opt ~ C^{f['n_exponent']:.3f}"
            + (f"; approach 2: N_opt ~ C^{entry['approach2']['n_exponent']:.3f}"
               if "n_exponent" in entry.get("approach2", {}) else "")
            + (f"; at {budget:.3g} FLOPs: N {entry['optimal']['N']:.3g}, D {entry['optimal']['D']:.3g}"
               if budget and "N" in entry["optimal"] else ""))
        log(f"sweep fit [{name}]: {entry['validation']['summary']}")
    return fitted


def laws_that_do_not_predict(report: dict) -> list[str]:
    """The loss kinds (mixture/kind with a mixture axis) whose held-out validation failed."""
    groups = {m: g["kinds"] for m, g in report["mixtures"].items()} if "mixtures" in report else {"": report["kinds"]}
    return [f"{m}/{k}" if m else k for m, kinds in groups.items() for k, e in kinds.items()
            if e.get("validation", {}).get("passed") is False]
