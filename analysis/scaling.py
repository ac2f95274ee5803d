"""Fitting scaling laws to a sweep's results (Hoffmann et al. 2022, "Chinchilla").

Approach 3: L(N, D) = E + A / N^alpha + B / D^beta, fitted by minimising the Huber loss (delta 1e-3)
of log L - log(exp(a - alpha log N) + exp(b - beta log D) + exp(e)) with L-BFGS from a grid of
initialisations (A = e^a, B = e^b, E = e^e), as the paper does (here from the 16 grid points with
the lowest objective); confidence intervals from a bootstrap over the points. Compute-optimal allocation
under C = 6 N D:
    N_opt(C) = G (C/6)^(beta/(alpha+beta)),  D_opt(C) = G^-1 (C/6)^(alpha/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)).
Approach 2: for each compute budget of an isoFLOP sweep, a parabola of L in log N gives the best
N; N_opt(C) and D_opt(C) = C / (6 N_opt) are then fitted as power laws of C.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

HUBER_DELTA = 1e-3
GRID = {"alpha": (0.2, 0.5, 1.0, 1.5), "beta": (0.2, 0.5, 1.0, 1.5), "e": (-1.0, 0.0, 1.0),
        "a": (0.0, 5.0, 10.0, 20.0), "b": (0.0, 5.0, 10.0, 20.0)}


STARTS = 16


class FitError(ValueError):
    """The results cannot support the fit asked for (too few sizes, budgets or points)."""


def _objective(x: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray):
    a, b, e, alpha, beta = x
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    r = logsumexp(terms, axis=0) - log_l
    small = np.abs(r) <= HUBER_DELTA
    loss = np.where(small, 0.5 * r ** 2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    dr = np.where(small, r, HUBER_DELTA * np.sign(r))
    w = softmax(terms, axis=0) * dr
    grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * log_n).sum(), -(w[1] * log_d).sum()])
    return loss, grad


def _lbfgs(x0, log_n, log_d, log_l):
    return minimize(_objective, x0, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B",
                    bounds=[(None, None)] * 3 + [(0.0, 5.0)] * 2, options={"maxiter": 1000, "gtol": 1e-12})


def params_of(x) -> dict:
    a, b, e, alpha, beta = (float(v) for v in x)
    return {"E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta,
            "n_exponent": beta / (alpha + beta), "d_exponent": alpha / (alpha + beta)}


def fit_approach3(n, d, loss, bootstrap: int = 100, seed: int = 0) -> dict:
    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    if len(np.unique(n)) < 3 or len(np.unique(d)) < 2:
        raise FitError(f"L(N, D) needs at least 3 model sizes and 2 token counts; the results have "
                       f"{len(np.unique(n))} sizes and {len(np.unique(d))} token counts")
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    grid = [np.array(x0, dtype=np.float64)
            for x0 in itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"])]
    # L-BFGS from the STARTS grid points with the lowest objective (all of them: minutes, same answer here)
    grid.sort(key=lambda x0: _objective(x0, log_n, log_d, log_l)[0])
    best = min((_lbfgs(x0, log_n, log_d, log_l) for x0 in grid[:STARTS]), key=lambda r: r.fun)
    fit = params_of(best.x)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(n[idx])) >= 3:
            samples.append(params_of(_lbfgs(best.x, log_n[idx], log_d[idx], log_l[idx]).x))
    fit["ci95"] = {k: [float(np.percentile([s[k] for s in samples], q)) for q in (2.5, 97.5)]
                   for k in fit} if samples else {}
    fit["huber_loss"] = float(best.fun)
    fit["points"] = len(n)
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in fit.items()}


def predict(fit: dict, n, d) -> np.ndarray:
    return fit["E"] + fit["A"] / np.asarray(n, dtype=np.float64) ** fit["alpha"] + \
        fit["B"] / np.asarray(d, dtype=np.float64) ** fit["beta"]


def optimal_allocation(fit: dict, budget: float) -> dict:
    """Compute-optimal N and D for `budget` FLOPs under C = 6 N D (approach 3)."""
    alpha, beta = fit["alpha"], fit["beta"]
    if min(alpha, beta, fit["A"], fit["B"]) <= 0:
        raise FitError(f"no compute-optimal allocation: the fitted loss does not fall with both N and D "
                       f"(alpha {alpha:.3g}, beta {beta:.3g}, A {fit['A']:.3g}, B {fit['B']:.3g})")
    g = (alpha * fit["A"] / (beta * fit["B"])) ** (1 / (alpha + beta))
    n_opt = g * (budget / 6) ** (beta / (alpha + beta))
    d_opt = (budget / 6) ** (alpha / (alpha + beta)) / g
    return {"budget_flops": budget, "N": float(n_opt), "D": float(d_opt), "tokens_per_parameter": float(d_opt / n_opt),
            "loss": float(predict(fit, n_opt, d_opt))}


def isoflop_minimum(n, loss) -> tuple[float, list[float]] | None:
    """(log N_opt, parabola coefficients) of one isoFLOP curve: the vertex of the parabola of loss in log N,
    or None when the sizes do not bracket it (the best point is the smallest or largest size, or the vertex
    lies outside the sizes: an extrapolated optimum)."""
    n, loss = np.asarray(n, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    log_n = np.log(n)
    p2, p1, p0 = np.polyfit(log_n, loss, 2)
    log_n_opt = -p1 / (2 * p2) if p2 > 0 else np.inf
    best = log_n[np.argmin(loss)]
    if not (log_n.min() <= log_n_opt <= log_n.max() and log_n.min() < best < log_n.max()):
        return None
    return float(log_n_opt), [float(p2), float(p1), float(p0)]


def fit_approach2(budgets, n, loss) -> dict:
    """Per-budget parabolas in log N -> N_opt(C) = k C^a, D_opt(C) = C / (6 N_opt) = k' C^b."""
    budgets, n, loss = (np.asarray(v, dtype=np.float64) for v in (budgets, n, loss))
    minima, skipped = [], []
    for c in np.unique(budgets):
        sel = budgets == c
        if len(np.unique(n[sel])) < 3:
            skipped.append(f"{c:.3g}: fewer than 3 sizes")
            continue
        found = isoflop_minimum(n[sel], loss[sel])
        if found is None:
            skipped.append(f"{c:.3g}: the sizes do not bracket the minimum")
            continue
        log_n_opt, parabola = found
        minima.append({"budget_flops": float(c), "N_opt": float(np.exp(log_n_opt)),
                       "D_opt": float(c / (6 * np.exp(log_n_opt))), "loss": float(np.polyval(parabola, log_n_opt)),
                       "parabola": parabola})
    if len(minima) < 2:
        raise FitError(f"approach 2 needs at least 2 compute budgets with 3+ sizes bracketing a minimum; "
                       f"found {len(minima)} ({'; '.join(skipped)})")
    log_c = np.log([m["budget_flops"] for m in minima])
    a, log_k = np.polyfit(log_c, np.log([m["N_opt"] for m in minima]), 1)
    b, log_kd = np.polyfit(log_c, np.log([m["D_opt"] for m in minima]), 1)
    return {"n_exponent": float(a), "n_coefficient": float(np.exp(log_k)), "d_exponent": float(b),
            "d_coefficient": float(np.exp(log_kd)), "budgets": minima, "skipped_budgets": skipped}
