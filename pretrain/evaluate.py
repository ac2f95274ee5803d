"""Loss per modality on held-out token shards: the same global batch at every evaluation."""

from __future__ import annotations

import torch

from data_pipeline.loader import Source, TokenLoader
from data_pipeline.vocab import VocabLayout
from .config import TrainConfig
from .metrics import losses_by_kind
from .step import PipelineLoss, run_step


@torch.no_grad()
def evaluate(engine, cfg: TrainConfig, sources: list[Source], vocab: VocabLayout, layout,
             pipeline_loss: PipelineLoss | None) -> dict:
    loader = TokenLoader(sources, vocab, cfg.data.seq_len, cfg.eval.sequences, cfg.data.micro_batch_size,
                         layout.dp_rank, layout.dp, cfg.data.seed)
    sums, _ = run_step(engine, loader.next_step(), 0.0, layout, pipeline_loss, train=False)
    return losses_by_kind(sums.cpu())
