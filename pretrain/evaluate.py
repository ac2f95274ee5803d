"""Loss per modality on held-out token shards: the same micro-batches at every evaluation."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from data_pipeline.loader import Source, TokenLoader
from data_pipeline.vocab import LOSS_KIND_NAMES, VocabLayout
from .config import TrainConfig
from .metrics import losses_by_kind
from .model import lm_loss


@torch.no_grad()
def evaluate(engine, cfg: TrainConfig, sources: list[Source], vocab: VocabLayout, layout) -> dict:
    loader = TokenLoader(sources, vocab, cfg.data.seq_len, cfg.data.micro_batch_size, layout.dp_rank,
                         layout.dp, cfg.data.seed, num_workers=0)
    sums = torch.zeros(2, len(LOSS_KIND_NAMES) + 1, device=layout.device)
    for _ in range(cfg.eval.batches):
        batch = {k: v.to(layout.device) for k, v in next(loader).items()}
        logits = engine(batch["tokens"], batch["positions"], batch["doc_ids"])
        sums += lm_loss(logits, batch["targets"], batch["loss_kind"], z_loss=0.0)[1]
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    return losses_by_kind(sums.cpu())
