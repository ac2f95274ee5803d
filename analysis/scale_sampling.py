"""Scale-wise sampling for next-scale models (VAR's inference, in the training form of data_pipeline/next_scale.py).

After the prompt (text, then `<|image start|> "h*w" <|image token|>`), one forward per map: the inputs of block k
(its marker for map 1, map k-1 upsampled for the others; from map 2 on preceded by map k-1's last code, as in
training), attending block-causally; the logits at block k's positions give all codes of map k at once, sampled
in parallel (with classifier-free guidance: a second row per prompt with the negative prompt, fed the same codes).
With the KV cache each forward feeds only the new positions; without it, the whole sequence (tested equal).
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.next_scale import map_sides, upsample_nearest
from data_pipeline.vocab import SCALE_MARKER, VisualPart, Vocabulary
from pretrain.model import KVCache, Transformer

from .sampling import Sampling, guide, left_pad, next_tokens


@torch.no_grad()
def sample_maps(model: Transformer, vocabulary: Vocabulary, part: VisualPart, prompts: list[list[int]], side: int,
                free_mask: torch.Tensor, s: Sampling, uncond: list[list[int]] | None = None,
                use_cache: bool = True) -> list[list[np.ndarray]]:
    """The maps (side_k x side_k codes, coarse to fine) of one image per prompt, whose finest map is side x side;
    `part` is the vocabulary's scale-kind ids."""
    n, device = len(prompts), next(model.parameters()).device
    rows = prompts + (uncond or [])
    tokens, positions, doc_ids = left_pad(rows, vocabulary.special("<|pad|>"), device)
    sides = map_sides(part.scale_maps, side)
    generator = torch.Generator().manual_seed(s.seed)
    cache = None
    if use_cache:
        total = tokens.shape[1] + sum(k * k + 1 for k in sides)
        cache = KVCache(model.cfg.n_layers, len(rows), total, model.cfg.n_kv_heads, model.cfg.head_dim,
                        next(model.parameters()).dtype, device)
        model(tokens, positions, doc_ids, cache)
    horizon = torch.arange(tokens.shape[1], device=device).repeat(len(rows), 1)
    free_mask, marker = free_mask.to(device), vocabulary.special(SCALE_MARKER)
    maps: list[np.ndarray] = []                                            # per map (n, side_k * side_k)
    for k, sk in enumerate(sides):
        if k == 0:
            new = np.full((n, sk * sk), marker)
        else:
            up = np.stack([upsample_nearest(m, sides[k - 1], sk) for m in maps[-1]]) + part.offset
            new = np.concatenate([maps[-1][:, -1:] + part.offset, up], 1)
        new = torch.as_tensor(np.concatenate([new, new]) if uncond else new, device=device)
        block = sk * sk                                                    # the last `block` new positions
        at = tokens.shape[1] if cache is None else cache.length            # index of the first new position
        new_positions = positions[:, -1:] + 1 + torch.arange(new.shape[1], device=device)
        new_horizon = (at + torch.arange(new.shape[1], device=device)).repeat(len(rows), 1)
        new_horizon[:, -block:] = at + new.shape[1] - 1                    # block k sees itself whole
        if cache is not None:
            logits = model(new, new_positions, torch.zeros_like(new), cache, horizon=new_horizon, last=block)
            positions = new_positions
        else:
            tokens, positions = torch.cat([tokens, new], 1), torch.cat([positions, new_positions], 1)
            doc_ids, horizon = torch.cat([doc_ids, torch.zeros_like(new)], 1), torch.cat([horizon, new_horizon], 1)
            logits = model(tokens, positions, doc_ids, horizon=horizon)[-block:]
        scores = logits[:, :n].float()                                     # (block, n, v)
        if uncond:
            scores = guide(scores, logits[:, n:].float(), s.cfg_scale)
        scores = scores.transpose(0, 1).reshape(n * block, -1).masked_fill(~free_mask, float("-inf"))
        codes = next_tokens(scores, s, generator).view(n, block).cpu().numpy() - part.offset
        maps.append(codes)
    return [[m[i].reshape(sk, sk) for m, sk in zip(maps, sides)] for i in range(n)]
