"""One optimizer step, or one evaluation, over this rank's micro-batches: plain or pipeline engine.

The loss of a step is the cross-entropy summed over every loss-bearing token of the global batch
divided by their number, whatever the layout: each micro-batch's sum is divided by the global
count / (dp x grad_accum), because DeepSpeed averages gradients over data-parallel ranks and
micro-batches. So one process and any (TP, PP, DP) layout compute the same gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from data_pipeline.vocab import LOSS_KIND_NAMES
from .model import lm_loss

NUM_KINDS = len(LOSS_KIND_NAMES) + 1


class PipelineLoss:
    """The last pipeline stage's loss_fn: the same lm_loss, collecting per-kind sums for logging."""

    def __init__(self, z_loss: float):
        self.z_loss, self.normalizer, self.sums = z_loss, None, None

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        targets, loss_kind = labels
        loss, sums = lm_loss(logits, targets, loss_kind, self.z_loss, self.normalizer)
        self.sums = sums if self.sums is None else self.sums + sums
        return loss


def global_count(micro: list[dict], device) -> torch.Tensor:
    """Loss-bearing tokens in the whole global batch (all data-parallel ranks)."""
    count = torch.tensor(float(sum(int((mb["loss_kind"] > 0).sum()) for mb in micro)), device=device)
    dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
    return count.clamp(min=1)


def run_step(engine, micro: list[dict], z_loss: float, layout, pipeline_loss: PipelineLoss | None,
             train: bool = True) -> torch.Tensor:
    """Forward (and backward and update when `train`) of the micro-batches; returns the per-kind
    [loss sum, count] of the whole global batch (2, kinds), the same on every rank."""
    micro = [{k: v.to(layout.device) for k, v in mb.items()} for mb in micro]
    normalizer = global_count(micro, layout.device) / (layout.dp * len(micro))
    if pipeline_loss is not None:
        pipeline_loss.normalizer, pipeline_loss.sums = normalizer, None
        batches = iter([((mb["tokens"], mb["positions"], mb["doc_ids"]), (mb["targets"], mb["loss_kind"]))
                        for mb in micro])
        if train:
            engine.train_batch(data_iter=batches)
        else:
            engine.eval_batch(data_iter=batches, num_micro_batches=len(micro))
        sums = pipeline_loss.sums if pipeline_loss.sums is not None else \
            torch.zeros(2, NUM_KINDS, device=layout.device)  # stages before the last have no loss
        dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    else:
        sums = torch.zeros(2, NUM_KINDS, device=layout.device)
        for mb in micro:
            with torch.set_grad_enabled(train):
                logits = engine(mb["tokens"], mb["positions"], mb["doc_ids"])
                loss, batch_sums = lm_loss(logits, mb["targets"], mb["loss_kind"], z_loss, normalizer)
            if train:
                engine.backward(loss)
                engine.step()  # applies the update at the accumulation boundary only
            sums += batch_sums
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    return sums
