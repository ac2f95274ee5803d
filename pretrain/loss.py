"""The training loss over vocab-parallel logits: cross-entropy (+ Chameleon's z-loss) per kind of token.

Each tensor-parallel rank holds a shard of the vocabulary's logits. megatron's
`vocab_parallel_cross_entropy` reduces over megatron's TP group, which it takes from `parallel_state`;
megatron has no logsumexp, so the z-loss's is written here, reducing over that same group. Both stay
with the loss (not in parallel.py) because one process and every layout compute it the same way: with
TP = 1 the reduces are no-ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel

from data_pipeline.vocab import NUM_LOSS_KINDS


def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the full vocabulary when each TP rank holds a shard: (s, b, v) -> (s, b)."""
    local_max = logits.max(dim=-1).values.detach()
    global_max = local_max.clone()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_tensor_model_parallel_group())
    sum_exp = (logits - global_max[..., None]).exp().sum(dim=-1)
    sum_exp = tensor_parallel.reduce_from_tensor_model_parallel_region(sum_exp)
    return sum_exp.log() + global_max


def position_weights(loss_kind: torch.Tensor, kind_weights: tuple[float, ...] | None) -> torch.Tensor:
    """Each position's weight in the loss: kind_weights[loss_kind] (loss.weights), or 1 where loss_kind > 0."""
    if kind_weights is None:
        return (loss_kind > 0).float()
    return torch.tensor(kind_weights, dtype=torch.float32, device=loss_kind.device)[loss_kind.long()]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_kind: torch.Tensor, z_loss: float,
            normalizer: float | torch.Tensor | None = None, num_kinds: int = NUM_LOSS_KINDS,
            kind_weights: tuple[float, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (+ z-loss) summed over positions with loss_kind > 0, each weighted by its kind's weight
    (default 1), divided by `normalizer` (default: this batch's sum of those weights), and per-kind sums.

    logits (s, b, v) local shard; targets, loss_kind (b, s). Returns the scalar loss and a
    (2, num_kinds) tensor of [loss sum, token count] per kind, unweighted, for exact logging across ranks.
    """
    targets, loss_kind = targets.t().contiguous(), loss_kind.t().contiguous()  # (s, b)
    logits32 = logits.float()
    # megatron's cross-entropy overwrites its input (in-place exp): give it a copy whenever the
    # logits are used again (by the caller, or by the z-loss)
    shared = z_loss or logits32.data_ptr() == logits.data_ptr()
    ce_input = logits32.clone() if shared else logits32
    per_token = tensor_parallel.vocab_parallel_cross_entropy(ce_input, targets)  # (s, b)
    weight = position_weights(loss_kind, kind_weights)  # (s, b)
    count = weight.sum().clamp(min=1) if normalizer is None else normalizer
    loss = (per_token * weight).sum() / count
    if z_loss:
        loss = loss + z_loss * (vocab_parallel_logsumexp(logits32).pow(2) * weight).sum() / count
    with torch.no_grad():
        kind_onehot = F.one_hot(loss_kind.long(), num_kinds).float()      # (s, b, kinds)
        sums = torch.stack([(per_token.detach()[..., None] * kind_onehot).sum((0, 1)), kind_onehot.sum((0, 1))])
    return loss, sums
