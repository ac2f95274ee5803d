"""Drawing tokens from logits: temperature, top-k / top-p, classifier-free guidance, and left-padded prompt
batches; shared by raster sampling (analysis/generate.py) and scale-wise sampling (analysis/scale_sampling.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    temperature: float = 1.0
    """Softmax temperature; 0 samples greedily."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1: all)."""
    cfg_scale: float = 1.0
    """Classifier-free guidance for images and video: logits = uncond + scale * (cond - uncond); 1: off."""
    negative_prompt: str = ""
    """Text of the unconditional branch of guidance."""
    max_new_tokens: int = 64
    """Text continuation and captions stop here or at <|eos|>."""
    seed: int = 0
    """Seed of the sampling generator: the same seed gives the same samples."""


def filter_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """(n, v) -> (n, v) with temperature applied and tokens outside top-k / top-p set to -inf."""
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = probs.cumsum(-1) - probs >= s.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> torch.Tensor:
    """(n, v) logits -> (n,) token ids."""
    if s.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float(), s).softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(logits.device)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, written as cond + (scale - 1)(cond - uncond) so that scale 1 gives
    `cond` exactly; entries that are -inf in either branch (vocabulary padding) keep cond's value."""
    finite = torch.isfinite(cond) & torch.isfinite(uncond)
    return cond + (scale - 1.0) * torch.where(finite, cond - uncond, torch.zeros_like(cond))


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> tokens, positions, doc_ids (b, L). Padding is document 1, the
    prompt document 0, and positions count from each prompt's first real token."""
    length = max(len(r) for r in rows)
    tokens = torch.full((len(rows), length), pad, dtype=torch.long)
    positions = torch.zeros_like(tokens)
    doc_ids = torch.ones_like(tokens)
    for i, row in enumerate(rows):
        start = length - len(row)
        tokens[i, start:] = torch.tensor(row)
        positions[i, start:] = torch.arange(len(row))
        doc_ids[i, start:] = 0
    return tokens.to(device), positions.to(device), doc_ids.to(device)
