"""Does a fitted law predict? Validation of approach 3 by held-out budgets (OLMo-core's rollout).

A scaling law exists to predict a bigger run, so it is judged on points it was not fitted on:
- rollout: fit on every budget but the largest, predict the largest budget's points;
- leave one budget out (with 3 or more budgets): each budget in turn predicted from the others.
The error of a point is predicted / observed - 1; a budget's error is the mean of |error| over its
points (and the worst). A rollout whose mean error exceeds the threshold (default 5%) fails, and
`loom sweep fit` says so in one line.
"""

from __future__ import annotations

import numpy as np

from .scaling import FitError, fit_approach3, predict

DEFAULT_THRESHOLD = 0.05
DEFAULT_KIND_THRESHOLD = 0.10  # a single modality's loss: the target, looser than the total's
NEGLIGIBLE_LOSS = 0.05  # nats: a kind whose losses at the largest budget all lie below has nothing left to predict
#                         (relative errors of near-zero losses, e.g. Loom's visual-structure tokens, mean nothing)


def predict_held_out(n, d, loss, budgets, held: float) -> dict:
    """Fit approach 3 on the points of every budget but `held`; predict the points of `held`."""
    n, d, loss, budgets = (np.asarray(v, dtype=np.float64) for v in (n, d, loss, budgets))
    train = budgets != held
    fit = fit_approach3(n[train], d[train], loss[train], bootstrap=0)
    predicted = predict(fit, n[~train], d[~train])
    errors = predicted / loss[~train] - 1
    return {"held_out_budget": float(held), "fitted_on": sorted(float(b) for b in np.unique(budgets[train])),
            "fit": {k: fit[k] for k in ("E", "A", "alpha", "B", "beta")},
            "points": [{"N": float(a), "D": float(b), "observed": float(o), "predicted": float(p),
                        "relative_error": float(e)}
                       for a, b, o, p, e in zip(n[~train], d[~train], loss[~train], predicted, errors)],
            "mean_abs_relative_error": float(np.mean(np.abs(errors))),
            "max_abs_relative_error": float(np.max(np.abs(errors)))}


def validate_law(n, d, loss, budgets, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Rollout (largest budget from the others) and leave-one-budget-out validation; `passed` is the
    rollout's mean |relative error| <= threshold. Budgets that cannot be fitted without are noted, not fatal."""
    values = sorted(float(b) for b in np.unique(np.asarray(budgets, dtype=np.float64)))
    report: dict = {"threshold": threshold, "budgets": values}
    largest = np.asarray(loss)[np.asarray(budgets, dtype=np.float64) == values[-1]]
    if np.max(largest) < NEGLIGIBLE_LOSS:
        return {**report, "passed": None,
                "summary": f"not validated: every loss of the largest budget is below {NEGLIGIBLE_LOSS} nats "
                           f"(nothing left to predict)"}
    if len(values) < 2:
        return {**report, "passed": None, "error": "validation needs at least 2 budgets (fit on one, predict another)",
                "summary": "not validated: a single budget"}
    try:
        report["rollout"] = predict_held_out(n, d, loss, budgets, values[-1])
    except FitError as e:
        return {**report, "passed": None, "error": f"rollout: {e}", "summary": f"not validated: {e}"}
    report["leave_one_budget_out"], skipped = [], []
    for held in values[:-1] if len(values) >= 3 else []:
        try:
            report["leave_one_budget_out"].append(predict_held_out(n, d, loss, budgets, held))
        except FitError as e:
            skipped.append(f"{held:.3g}: {e}")
    report["leave_one_budget_out_skipped"] = skipped
    rollout = report["rollout"]
    report["passed"] = rollout["mean_abs_relative_error"] <= threshold
    mean, worst = rollout["mean_abs_relative_error"], rollout["max_abs_relative_error"]
    verdict = f"predicts {values[-1]:.3g}" if report["passed"] else f"DOES NOT PREDICT {values[-1]:.3g}"
    report["summary"] = (f"the law fitted on {_budget_list(rollout['fitted_on'])} {verdict}: mean error {mean:.1%} "
                         f"({'<=' if report['passed'] else '>'} {threshold:.0%}), worst {worst:.1%}")
    if report["leave_one_budget_out"]:
        worst = max(report["leave_one_budget_out"], key=lambda r: r["mean_abs_relative_error"])
        report["summary"] += (f"; leave-one-budget-out worst {worst['held_out_budget']:.3g} "
                              f"({worst['mean_abs_relative_error']:.1%})")
    return report


def _budget_list(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)
