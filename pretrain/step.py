"""One optimizer step, or one evaluation, over this rank's micro-batches: plain or pipeline engine.

The loss of a step is the cross-entropy summed over every loss-bearing token of the global batch
divided by their number (with loss.weights: a weighted sum divided by the sum of the weights), whatever the
layout: each micro-batch's sum is divided by the global
count / (dp x grad_accum), because DeepSpeed averages gradients over data-parallel ranks and
micro-batches. So one process and any (TP, PP, DP) layout compute the same gradient. Under context
parallelism each rank of a CP group takes its part of every row (`context_part`), DeepSpeed averages
over data x context ranks, and the count and the sums are reduced over both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from data_pipeline.vocab import NUM_LOSS_KINDS
from .hooks import TrainHooks
from .loss import lm_loss, position_weights
from .resilience import phase



class PipelineLoss:
    """The last pipeline stage's loss_fn: the same lm_loss, collecting per-kind sums for logging."""

    def __init__(self, z_loss: float):
        self.z_loss, self.kind_weights, self.normalizer, self.sums = z_loss, None, None, None
        self.on_loss = None  # (loss, sums) -> (loss, sums) of the step being trained: the hooks' point

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        targets, loss_kind = labels
        loss, sums = lm_loss(logits, targets, loss_kind, self.z_loss, self.normalizer,
                             kind_weights=self.kind_weights)
        if self.on_loss is not None:
            loss, sums = self.on_loss(loss, sums)
        self.sums = sums if self.sums is None else self.sums + sums
        return loss


def context_part(mb: dict, layout) -> dict:
    """This context-parallel rank's part of every row of a micro-batch: the cp_rank-th of cp equal parts of the
    tokens, targets, positions and loss kinds; doc_ids and horizon stay whole (the keys of the whole row are
    attended to)."""
    if layout.cp == 1:
        return mb
    part = mb["tokens"].shape[1] // layout.cp
    cut = slice(layout.cp_rank * part, (layout.cp_rank + 1) * part)
    return {k: v if k in ("doc_ids", "horizon") else v[:, cut] for k, v in mb.items()}


def horizon_of(mb: dict) -> torch.Tensor:
    """The micro-batch's horizon (b, s): the loader's, or plain causal (each position sees up to itself) for
    batches made without one (benchmarks)."""
    if "horizon" in mb:
        return mb["horizon"]
    doc_ids = mb["doc_ids"]
    return torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids).contiguous()


def data_group():
    """Ranks holding different tokens of the same weights: data- and context-parallel."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def global_count(micro: list[dict], device, step: int, hooks: TrainHooks,
                 kind_weights: tuple[float, ...] | None) -> torch.Tensor:
    """Loss-bearing tokens in the whole global batch (all data- and context-parallel ranks), each counted with
    its kind's weight."""
    count = torch.tensor(float(sum(position_weights(mb["loss_kind"], kind_weights).double().sum() for mb in micro)),
                         device=device)
    with phase("the data-parallel all-reduce of the batch's loss-token count"):
        hooks.step_started(step, dist.get_rank())
        dist.all_reduce(count, group=data_group())
    return count.clamp(min=1)


def run_step(engine, micro: list[dict], z_loss: float, layout, pipeline_loss: PipelineLoss | None,
             train: bool = True, step: int = 0, hooks: TrainHooks = TrainHooks(),
             kind_weights: tuple[float, ...] | None = None) -> tuple[torch.Tensor, bool]:
    """Forward (and backward and update when `train`) of the micro-batches of optimizer step `step`, the loss
    weighted by `kind_weights` per loss kind (training only; evaluation weighs every token 1). Returns
    the per-kind [loss sum, count] of the whole global batch (2, kinds), the same on every rank, and whether
    this rank's own loss was not finite (before the all-reduces spread it)."""
    micro = [{k: v.to(layout.device) for k, v in context_part(mb, layout).items()} for mb in micro]
    kind_weights = kind_weights if train else None
    normalizer = global_count(micro, layout.device, step, hooks, kind_weights) / (layout.dp * layout.cp * len(micro))
    on_loss = (lambda loss, sums: hooks.micro_batch_loss(step, layout.rank, loss, sums)) if train else None
    with phase("forward, backward and optimizer step (tensor-, pipeline- and data-parallel collectives)"):
        sums = forward_backward(engine, micro, z_loss, layout, pipeline_loss, train, normalizer, on_loss,
                                kind_weights)
    local_bad = not bool(torch.isfinite(sums).all())
    with phase("the all-reduce of the loss sums"):
        if pipeline_loss is not None:
            dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
        dist.all_reduce(sums, group=data_group())
    return sums, local_bad


def forward_backward(engine, micro: list[dict], z_loss: float, layout, pipeline_loss: PipelineLoss | None,
                     train: bool, normalizer: torch.Tensor, on_loss, kind_weights) -> torch.Tensor:
    """This rank's part: its per-kind sums (zeros on pipeline stages before the last)."""
    if pipeline_loss is not None:
        pipeline_loss.normalizer, pipeline_loss.kind_weights = normalizer, kind_weights
        pipeline_loss.sums, pipeline_loss.on_loss = None, on_loss
        batches = iter([((mb["tokens"], mb["positions"], mb["doc_ids"], horizon_of(mb)),
                         (mb["targets"], mb["loss_kind"])) for mb in micro])
        if train:
            engine.train_batch(data_iter=batches)
        else:
            engine.eval_batch(data_iter=batches, num_micro_batches=len(micro))
        pipeline_loss.on_loss = None
        if pipeline_loss.sums is None:  # stages before the last have no loss
            return torch.zeros(2, NUM_LOSS_KINDS, device=layout.device)
        return pipeline_loss.sums
    sums = torch.zeros(2, NUM_LOSS_KINDS, device=layout.device)
    for mb in micro:
        with torch.set_grad_enabled(train):
            logits = engine(mb["tokens"], mb["positions"], mb["doc_ids"], horizon=horizon_of(mb))
            loss, batch_sums = lm_loss(logits, mb["targets"], mb["loss_kind"], z_loss, normalizer,
                                       kind_weights=kind_weights)
        if on_loss is not None:
            loss, batch_sums = on_loss(loss, batch_sums)
        if train:
            engine.backward(loss)
            engine.step()  # applies the update at the accumulation boundary only
        sums += batch_sums
    return sums
