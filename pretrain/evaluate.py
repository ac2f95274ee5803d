"""Loss per modality on held-out token shards: the same global batch at every evaluation, on the sources mixed as
configured and, where there are several, on each source's own documents (a modality's loss measured where that
modality is the data, e.g. text loss on text documents rather than on image captions)."""

from __future__ import annotations

import dataclasses

import torch

from data_pipeline.loader import Source, TokenLoader
from data_pipeline.vocab import Vocabulary
from .config import TrainConfig
from .metrics import counts_by_kind, losses_by_kind
from .step import PipelineLoss, run_step


@torch.no_grad()
def held_out_sums(engine, cfg: TrainConfig, sources: list[Source], vocab: Vocabulary, layout,
                  pipeline_loss: PipelineLoss | None) -> torch.Tensor:
    """(2, kinds) [loss sum, token count] over eval.sequences sequences drawn from `sources`."""
    loader = TokenLoader(sources, vocab, seq_len=cfg.data.seq_len, global_batch_size=cfg.eval.sequences,
                         micro_batch_size=cfg.data.micro_batch_size, dp_rank=layout.dp_rank, dp_size=layout.dp,
                         seed=cfg.data.seed)
    sums, _ = run_step(engine, loader.next_step(), 0.0, layout, pipeline_loss, train=False)
    return sums.cpu()


def evaluate(engine, cfg: TrainConfig, sources: list[Source], vocab: Vocabulary, layout,
             pipeline_loss: PipelineLoss | None) -> tuple[dict, dict]:
    """Losses per kind on the mixed held-out set, and {source: {"loss": per kind, "tokens": per kind}} for each
    source alone (empty with one source). A source alone is read at weight 1, whatever its weight in the mix."""
    mixed = losses_by_kind(held_out_sums(engine, cfg, sources, vocab, layout, pipeline_loss))
    by_source = {}
    if len(sources) > 1:
        for source in sources:
            sums = held_out_sums(engine, cfg, [dataclasses.replace(source, weight=1.0)], vocab, layout, pipeline_loss)
            by_source[source.name] = {"loss": losses_by_kind(sums), "tokens": counts_by_kind(sums)}
    return mixed, by_source
