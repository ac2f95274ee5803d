"""PNG plots of a scaling-law fit: loss vs compute with the fitted frontier, isoFLOP curves, fitted vs observed,
and predicted vs observed on held-out budgets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .scaling import FitError, optimal_allocation, predict


def plot_kind(out: Path, kind: str, rows: list[dict], n, d, loss, entry: dict, budgets) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit = entry["approach3"]
    compute = np.array([r["C"] for r in rows])
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    points = ax.scatter(compute, loss, c=np.log10(n), cmap="viridis")
    fig.colorbar(points, label="log10 N")
    grid = np.logspace(np.log10(compute.min()) - 0.5, np.log10(compute.max()) + 1, 50)
    try:
        ax.plot(grid, [optimal_allocation(fit, c)["loss"] for c in grid], "k--", label="compute-optimal (approach 3)")
    except FitError:
        pass  # a degenerate fit (the loss does not fall with N or with D) has no frontier to draw
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel=f"{kind} loss", title=f"{kind}: loss vs compute")
    ax.legend()
    paths.append(_save(fig, out / f"loss_vs_compute_{kind}.png"))

    if budgets is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in np.unique(budgets):
            sel = budgets == c
            order = np.argsort(n[sel])
            line, = ax.plot(n[sel][order], loss[sel][order], "o", label=f"C = {c:.2g}")
            parabola = next((m["parabola"] for m in entry.get("approach2", {}).get("budgets", [])
                             if m["budget_flops"] == c), None)
            if parabola:
                xs = np.linspace(np.log(n[sel].min()), np.log(n[sel].max()), 50)
                ax.plot(np.exp(xs), np.polyval(parabola, xs), "-", color=line.get_color())
        ax.set(xscale="log", xlabel="parameters N", ylabel=f"{kind} loss", title=f"{kind}: isoFLOP curves")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / f"isoflop_{kind}.png"))

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    fitted = predict(fit, n, d)
    ax.scatter(loss, fitted)
    lo, hi = min(loss.min(), fitted.min()), max(loss.max(), fitted.max())
    ax.plot([lo, hi], [lo, hi], "k--")
    ax.set(xlabel="observed loss", ylabel="fitted L(N, D)", title=f"{kind}: fitted vs observed")
    paths.append(_save(fig, out / f"fit_vs_observed_{kind}.png"))

    validation = entry.get("validation", {})
    if "rollout" in validation:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        held = [("rollout", validation["rollout"], "o")] + \
            [("left out", r, "x") for r in validation.get("leave_one_budget_out", [])]
        values = []
        for label, result, marker in held:
            observed = [p["observed"] for p in result["points"]]
            predicted = [p["predicted"] for p in result["points"]]
            values += observed + predicted
            ax.scatter(observed, predicted, marker=marker,
                       label=f"{label}: C = {result['held_out_budget']:.2g} ({result['mean_abs_relative_error']:.1%})")
        lo, hi = min(values), max(values)
        ax.plot([lo, hi], [lo, hi], "k--")
        t = validation["threshold"]
        ax.fill_between([lo, hi], [lo * (1 - t), hi * (1 - t)], [lo * (1 + t), hi * (1 + t)], color="grey", alpha=0.2,
                        label=f"within {t:.0%}")
        ax.set(xlabel="observed loss", ylabel="predicted from the other budgets", title=f"{kind}: held-out budgets")
        ax.legend(fontsize=6)
        paths.append(_save(fig, out / f"validation_{kind}.png"))
    return paths


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)
