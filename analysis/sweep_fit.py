"""`loom sweep fit`: every loss kind of a sweep's results fitted (analysis/scaling.py), plotted
(analysis/scaling_plots.py) and written to report.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .scaling import FitError, fit_approach2, fit_approach3, optimal_allocation
from .scaling_plots import plot_kind


def load_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FitError(f"results not found: {path} (written by `loom sweep run` or `loom sweep collect`)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise FitError(f"{path} has no finished points")
    return rows


def losses(row: dict) -> tuple[dict, str]:
    """The held-out loss per kind where the run evaluated, else the final training loss."""
    return (row["eval_loss"], "eval") if row.get("eval_loss") else (row["final_loss"], "train")


def fit_sweep(results: str | Path, out: str | Path, budget: float | None = None, params: str = "N",
              bootstrap: int = 100, log=print) -> dict:
    """Fit every loss kind of a results table; writes report.json and PNG plots into `out`."""
    rows = load_results(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = sorted(set.intersection(*(set(losses(r)[0]) for r in rows)))
    report = {"results": str(results), "points": len(rows), "params": params,
              "loss_source": sorted({losses(r)[1] for r in rows}), "kinds": {}}
    n = np.array([r[params] for r in rows], dtype=np.float64)
    d = np.array([r["D"] for r in rows], dtype=np.float64)
    isoflop = [r["budget"].startswith("flops=") for r in rows]
    budgets = np.array([float(r["budget"].split("=")[1]) if iso else np.nan for r, iso in zip(rows, isoflop)])
    for kind in kinds:
        loss = np.array([losses(r)[0][kind] for r in rows])
        entry = {"approach3": fit_approach3(n, d, loss, bootstrap)}
        if all(isoflop):
            try:
                entry["approach2"] = fit_approach2(budgets, n, loss)
            except FitError as e:
                entry["approach2"] = {"error": str(e)}
        if budget:
            entry["optimal"] = optimal_allocation(entry["approach3"], budget)
        entry["plots"] = plot_kind(out, kind, rows, n, d, loss, entry, budgets if all(isoflop) else None)
        report["kinds"][kind] = entry
        f = entry["approach3"]
        log(f"sweep fit [{kind}]: E {f['E']:.3f} A {f['A']:.3g} alpha {f['alpha']:.3f} B {f['B']:.3g} "
            f"beta {f['beta']:.3f}; N_opt ~ C^{f['n_exponent']:.3f}"
            + (f"; approach 2: N_opt ~ C^{entry['approach2']['n_exponent']:.3f}"
               if "n_exponent" in entry.get("approach2", {}) else "")
            + (f"; at {budget:.3g} FLOPs: N {entry['optimal']['N']:.3g}, D {entry['optimal']['D']:.3g}"
               if budget else ""))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log(f"sweep fit: {len(rows)} points, {len(kinds)} loss kinds -> {out / 'report.json'}")
    return report
