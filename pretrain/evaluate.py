"""Loss per modality on held-out token shards: the same global batch at every evaluation."""

from __future__ import annotations

import torch

from data_pipeline.loader import Source, TokenLoader
from data_pipeline.vocab import Vocabulary
from .config import TrainConfig
from .metrics import losses_by_kind
from .step import PipelineLoss, run_step


@torch.no_grad()
def evaluate(engine, cfg: TrainConfig, sources: list[Source], vocab: Vocabulary, layout,
             pipeline_loss: PipelineLoss | None) -> dict:
    loader = TokenLoader(sources, vocab, seq_len=cfg.data.seq_len, global_batch_size=cfg.eval.sequences,
                         micro_batch_size=cfg.data.micro_batch_size, dp_rank=layout.dp_rank, dp_size=layout.dp,
                         seed=cfg.data.seed)
    sums, _ = run_step(engine, loader.next_step(), 0.0, layout, pipeline_loss, train=False)
    return losses_by_kind(sums.cpu())
