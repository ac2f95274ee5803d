"""A checkpoint of any layout as one in-process model, and its loss per modality on token shards.

`loom eval nll` uses it to check exports and resumes without torchrun: the weights are
consolidated (pretrain/consolidate.py) into the single-process Transformer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from checkpoints_utils.reader import read_checkpoint, resolve_checkpoint
from common.checkpoint_folders import CheckpointError
from data_pipeline.loader import Source, TokenLoader, read_manifest_fingerprints
from data_pipeline.vocab import NUM_LOSS_KINDS
from pretrain.config import ParallelConfig, TrainConfig
from pretrain.loss import lm_loss
from pretrain.metrics import bits_per_token, counts_by_kind, losses_by_kind
from pretrain.model import Transformer
from pretrain.parallel import single_process_groups, tensor_parallel_of


def load_model(ckpt: str | Path) -> tuple[Transformer, TrainConfig, dict]:
    """The checkpoint's weights in a single-process Transformer (fp32, eval mode)."""
    folder = resolve_checkpoint(ckpt)
    params, cfg, shared = read_checkpoint(folder)
    single_process_groups()
    cfg.parallel = ParallelConfig()
    model = Transformer(cfg.model, tensor_parallel_of(cfg), cfg.seed)
    missing, unexpected = model.load_state_dict(params, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit the model of its config.yaml "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), cfg, {**shared, "checkpoint": str(folder)}


@torch.no_grad()
def evaluate_nll(ckpt: str | Path, data: list[str | Path], max_tokens: int = 100_000, seq_len: int = 0,
                 batch_size: int = 4) -> dict:
    """Mean loss per modality and overall on the first `max_tokens` sequence positions of `data`,
    packed by the loader with seed 0 into rows of `seq_len` (0: the checkpoint's), so that two
    checkpoints given the same arguments are scored on the same tokens."""
    model, cfg, shared = load_model(ckpt)
    sources = [Source.open(Path(d).name, d, 1.0) for d in data]
    fp, layout = read_manifest_fingerprints(sources)
    if shared.get("fingerprint") and fp != shared["fingerprint"]:
        raise CheckpointError(f"{data[0]} was tokenized with vocabulary {fp}, the model trained on "
                              f"{shared['fingerprint']}")
    loader = TokenLoader(sources, layout, seq_len=seq_len or cfg.data.seq_len, global_batch_size=batch_size,
                         micro_batch_size=batch_size, seed=0)
    sums = torch.zeros(2, NUM_LOSS_KINDS)
    positions = 0
    while positions < max_tokens:
        for mb in loader.next_step():
            logits = model(mb["tokens"], mb["positions"], mb["doc_ids"], horizon=mb["horizon"])
            sums += lm_loss(logits, mb["targets"], mb["loss_kind"], 0.0)[1]
            positions += mb["tokens"].numel()
    tokens = counts_by_kind(sums)
    losses = losses_by_kind(sums)
    return {"checkpoint": shared["checkpoint"], "step": shared["step"], "data": [str(d) for d in data],
            "positions": positions, "loss": losses,
            "bits_per_token": bits_per_token(losses),
            "loss_tokens": {"total": int(sums[1, 1:].sum()), **tokens}}
