"""The language model's metrics: losses per kind of token, bits per visual token, the run summary
(the logger itself is common/metrics.py)."""

from __future__ import annotations

import math

from data_pipeline.vocab import LOSS_KIND_MEMBERS, LOSS_KIND_NAMES


def counts_by_kind(sums) -> dict:
    """(2, kinds) [loss sum, count] -> {'text': tokens, ...} for kinds that occur ('image' over every map)."""
    count = sums[1].tolist()
    totals = {name: sum(count[k] for k in LOSS_KIND_MEMBERS[kind]) for kind, name in LOSS_KIND_NAMES.items()}
    return {name: int(n) for name, n in totals.items() if n > 0}


def losses_by_kind(sums) -> dict:
    """(2, kinds) [loss sum, count] -> {'total': mean, 'text': mean, ...} for kinds that occur; 'image' is the
    mean over every image code, 'image_map_k' over those of next-scale map k."""
    loss_sum, count = sums[0].tolist(), sums[1].tolist()
    out = {"total": sum(loss_sum[1:]) / max(sum(count[1:]), 1)}
    for kind, name in LOSS_KIND_NAMES.items():
        n = sum(count[k] for k in LOSS_KIND_MEMBERS[kind])
        if n > 0:
            out[name] = sum(loss_sum[k] for k in LOSS_KIND_MEMBERS[kind]) / n
    return out


def bits_per_token(losses: dict) -> dict:
    """Mean image and video losses (nats) in bits: the code length of a visual token under the model."""
    return {k: losses[k] / math.log(2) for k in ("image", "video") if k in losses}


def summarize(records: list[dict], last: int = 10) -> dict:
    """Training loss per modality at the first step and averaged over the last `last` steps, and
    held-out loss before training and at the end, where the run evaluated."""
    train = [r for r in records if "loss" in r]
    if not train:
        return {}
    tail = train[-last:]
    kinds = set(train[0]["loss"]) & set.intersection(*(set(r["loss"]) for r in tail))
    summary = {"steps": train[-1]["step"],
               "initial_loss": {k: train[0]["loss"][k] for k in sorted(kinds)},
               "final_loss": {k: sum(r["loss"][k] for r in tail) / len(tail) for k in sorted(kinds)},
               "consumed_tokens": train[-1]["consumed_tokens"]}
    evals = [r for r in records if "eval_loss" in r]
    if len(evals) >= 2:
        summary["initial_eval_loss"], summary["final_eval_loss"] = evals[0]["eval_loss"], evals[-1]["eval_loss"]
        if "eval_by_source" in evals[-1]:
            summary["final_eval_by_source"] = evals[-1]["eval_by_source"]
    return summary
