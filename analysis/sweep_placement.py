"""Adaptive isoFLOP placement: each budget's model sizes centred on the compute-optimal size that the
smaller budgets' results predict, so that every isoFLOP curve brackets its minimum.

N_opt of a finished budget is the vertex of the parabola of loss in log N through its points (approach 2)
when its best point lies inside the sampled sizes, else the best point's N (the optimum is at or beyond that
edge, and centring the next budget there moves the window towards it). The next budget's N_opt is the
power law N_opt ~ C^a through the bracketed minima when there are two or more, otherwise the last
budget's N_opt times (C_next / C_last)^exponent (Chinchilla's a = 0.5 by default).
"""

from __future__ import annotations

import numpy as np

from .scaling import isoflop_minimum


def budget_minimum(n, loss) -> tuple[float, bool]:
    """(N_opt, bracketed) of one isoFLOP curve: the parabola's vertex where the sizes bracket it
    (analysis/scaling.isoflop_minimum), else the best point's N."""
    n, loss = np.asarray(n, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    found = isoflop_minimum(n, loss) if len(np.unique(n)) >= 3 else None
    return (float(np.exp(found[0])), True) if found else (float(n[np.argmin(loss)]), False)


def predict_n_opt(rows: list[dict], budget: float, exponent: float = 0.5) -> dict:
    """N_opt at `budget` FLOPs from finished rows of smaller budgets (each row: C budget, N, loss)."""
    values = sorted({r["budget"] for r in rows if r["budget"] < budget})
    if not values:
        raise ValueError(f"no finished budget below {budget:.3g} to place its sizes from")
    minima = []
    for c in values:
        n_opt, bracketed = budget_minimum([r["N"] for r in rows if r["budget"] == c],
                                          [r["loss"] for r in rows if r["budget"] == c])
        minima.append({"budget": c, "N_opt": n_opt, "bracketed": bracketed})
    bracketed = [m for m in minima if m["bracketed"]]
    if len(bracketed) >= 2:
        a, log_k = np.polyfit(np.log([m["budget"] for m in bracketed]), np.log([m["N_opt"] for m in bracketed]), 1)
        n_opt, how = float(np.exp(log_k) * budget ** a), f"N_opt ~ C^{a:.3f} through {len(bracketed)} minima"
    else:
        last = minima[-1]
        n_opt = last["N_opt"] * (budget / last["budget"]) ** exponent
        how = (f"{'minimum' if last['bracketed'] else 'best size (minimum not bracketed)'} of {last['budget']:.3g} "
               f"scaled by C^{exponent:g}")
    return {"N_opt": n_opt, "how": how, "minima": minima}


def place_depths(sizes: dict[int, float], n_opt: float, count: int) -> list[int]:
    """The `count` depths (of depth -> N) whose N lie closest around n_opt: a window of consecutive sizes
    centred on the size nearest to n_opt, shifted inwards at the ends of the range."""
    depths = sorted(sizes, key=lambda k: sizes[k])
    nearest = int(np.argmin([abs(np.log(sizes[k] / n_opt)) for k in depths]))
    start = min(max(nearest - count // 2, 0), max(len(depths) - count, 0))
    return sorted(depths[start:start + count])
