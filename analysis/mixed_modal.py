"""The bimodal scaling law of Aghajanyan et al. 2023 ("Scaling Laws for Generative Mixed-Modal Language
Models", eq. 2): a model trained on modalities i and j together reaches

    L_ij(N, D_i, D_j) = (L_i(N, D_i) + L_j(N, D_j)) / 2 - C_ij + A_ij / N^alpha_ij + B_ij / (D_i + D_j)^beta_ij

where L_i and L_j are the uni-modal Chinchilla laws of models trained on one modality alone. The last three
terms are the interaction: C_ij > 0 with small A/N and B/D terms is synergy (the mixed model beats the
average of the uni-modal ones), a large A_ij / N^alpha_ij is competition that more parameters overcome.

Here the modalities are Loom's text and image loss kinds; a sweep with a mixture axis supplies
uni-modal runs (image share 0 and 1) and mixed runs (0 < share < 1, D_i = (1 - share) D,
D_j = share D); L_ij of a mixed run is the mean of its held-out text and image losses. The uni-modal laws
are fitted by approach 3 (analysis/scaling.py); the interaction by least squares on the residual
L_ij - (L_i + L_j) / 2 from a grid of starting points.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import least_squares

from .scaling import STARTS, FitError, fit_approach3, predict

INTERACTION_GRID = {"c": (-1.0, 0.0, 1.0), "log_a": (0.0, 5.0, 10.0), "log_b": (0.0, 5.0, 10.0),
                    "alpha": (0.2, 0.5, 1.0), "beta": (0.2, 0.5, 1.0)}


def interaction(x, n, d_total) -> np.ndarray:
    c, log_a, log_b, alpha, beta = x
    return -c + np.exp(log_a - alpha * np.log(n)) + np.exp(log_b - beta * np.log(d_total))


def fit_interaction(n, d_i, d_j, residual) -> dict:
    """C, A, alpha, B, beta of -C + A / N^alpha + B / (D_i + D_j)^beta fitted to `residual`."""
    n, d_total, residual = (np.asarray(v, dtype=np.float64) for v in (n, np.add(d_i, d_j), residual))
    if len(np.unique(n)) < 3 or len(np.unique(d_total)) < 3:
        raise FitError(f"the interaction term needs mixed runs of at least 3 sizes and 3 token counts; found "
                       f"{len(np.unique(n))} sizes and {len(np.unique(d_total))} token counts")

    def cost(x):
        return float(np.sum((interaction(x, n, d_total) - residual) ** 2))

    def fit_from(x0):
        return least_squares(lambda x: interaction(x, n, d_total) - residual, x0, method="trf",
                             bounds=([-np.inf, -50, -50, 0.0, 0.0], [np.inf, 100, 100, 5.0, 5.0]),
                             x_scale="jac", max_nfev=2000)
    # least squares from the STARTS grid points of lowest cost, as approach 3 starts L-BFGS
    grid = sorted((np.array(x0, dtype=np.float64) for x0 in itertools.product(*INTERACTION_GRID.values())), key=cost)
    best = min((fit_from(x0) for x0 in grid[:STARTS]), key=lambda r: r.cost)
    c, log_a, log_b, alpha, beta = (float(v) for v in best.x)
    return {"C": c, "A": float(np.exp(log_a)), "alpha": alpha, "B": float(np.exp(log_b)), "beta": beta,
            "rms_residual": float(np.sqrt(np.mean(best.fun ** 2))), "points": len(n)}


def predict_bimodal(fit: dict, n, d_i, d_j) -> np.ndarray:
    """L_ij from the two uni-modal laws and the interaction."""
    f = fit["interaction"]
    n, d_i, d_j = (np.asarray(v, dtype=np.float64) for v in (n, d_i, d_j))
    return (predict(fit["unimodal"]["i"], n, d_i) + predict(fit["unimodal"]["j"], n, d_j)) / 2 - f["C"] + \
        f["A"] / n ** f["alpha"] + f["B"] / (d_i + d_j) ** f["beta"]


def modality_losses(row: dict) -> dict:
    """A sweep row's held-out loss per kind, each kind measured on the held-out source where it makes up the largest
    share of loss tokens (text loss on text documents, not on image captions) when the run evaluated its sources
    one by one; the total, and every kind of a run without per-source evaluation, from the mixed held-out set
    (else from training)."""
    mixed = dict(row.get("eval_loss") or row["final_loss"])
    by_source = row.get("eval_by_source") or {}
    for kind in mixed:
        shares = {name: s["tokens"].get(kind, 0) / sum(s["tokens"].values()) for name, s in by_source.items()
                  if kind != "total" and kind in s["loss"]}
        if shares:
            mixed[kind] = by_source[max(shares, key=shares.get)]["loss"][kind]
    return mixed


def fit_bimodal(rows: list[dict], i: str = "text", j: str = "image", params: str = "N") -> dict:
    """Aghajanyan et al.'s bimodal law from sweep rows with an image share (0: only i, 1: only j, between: both),
    each with held-out (else training) losses per kind, measured per modality where the run has them."""
    def loss(r, kind):
        return modality_losses(r)[kind]

    share = np.array([r.get("image_share") if r.get("image_share") is not None else np.nan for r in rows])
    only_i, only_j, mixed = share == 0, share == 1, (share > 0) & (share < 1)
    if not (only_i.any() and only_j.any() and mixed.any()):
        raise FitError(f"the bimodal law needs runs with image share 0 ({i} only), 1 ({j} only) and in between; "
                       f"found shares {sorted(set(share[~np.isnan(share)].tolist()))}")
    n = np.array([r[params] for r in rows], dtype=np.float64)
    d = np.array([r["D"] for r in rows], dtype=np.float64)
    unimodal = {"i": fit_approach3(n[only_i], d[only_i], [loss(r, i) for r, s in zip(rows, only_i) if s], 0),
                "j": fit_approach3(n[only_j], d[only_j], [loss(r, j) for r, s in zip(rows, only_j) if s], 0)}
    d_i, d_j = d[mixed] * (1 - share[mixed]), d[mixed] * share[mixed]
    observed = np.array([(loss(r, i) + loss(r, j)) / 2 for r, s in zip(rows, mixed) if s])
    residual = observed - (predict(unimodal["i"], n[mixed], d_i) + predict(unimodal["j"], n[mixed], d_j)) / 2
    fit = {"modalities": [i, j], "unimodal": unimodal, "interaction": fit_interaction(n[mixed], d_i, d_j, residual)}
    fitted = predict_bimodal(fit, n[mixed], d_i, d_j)
    fit["mean_abs_relative_error"] = float(np.mean(np.abs(fitted / observed - 1)))
    fit["synergy_at_largest_mixed_run"] = float(-np.mean(residual[n[mixed] == n[mixed].max()]))
    return fit
