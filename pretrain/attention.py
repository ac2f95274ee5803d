"""Attention over packed documents: the document-causal mask, and the kernel that takes it.

A token sees the earlier tokens of its own document, a contiguous run of equal doc ids in a row. A row may
also carry `horizon` (b, L): the last position each query sees in its document (itself, or further for the
block-causal positions of next-scale prediction, where every position of a block sees the whole block;
data_pipeline/next_scale.py). Without it, or where it equals the position, the mask is causal.
- A batch whose rows hold one document each needs no mask: SDPA's causal path (flash kernels).
- 'flex': FlexAttention with a `BlockMask` built from the doc ids. Blocks of 128 x 128 (query, key)
  positions that no query may see are skipped, blocks inside one document before the diagonal run
  without a mask, and nothing of size s x s exists: memory and work grow with the sum of the
  documents' squared lengths, not with s^2. Compiled on CUDA, it is a fused kernel.
- 'sdpa': a dense boolean (b, 1, s, s) mask; only SDPA's mem-efficient and math kernels take one, and the
  mask alone is s^2 bytes per row (1 GiB at 32k).
torch 2.13's FlexAttention runs forward only on the CPU (no backward there), so 'auto' is flex on CUDA and
sdpa elsewhere; the CPU can still check flex's numerics with its reference (eager) implementation.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

ATTENTION_KERNELS = ("auto", "flex", "sdpa")
BLOCK = 128  # FlexAttention's default block size, in query and key positions


def kernel_for(requested: str, device: torch.device) -> str:
    """'flex' or 'sdpa': what `model.attention` means on `device`."""
    if requested == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return requested


@functools.cache
def flex_trains_on(device_type: str) -> bool:
    """Whether FlexAttention has a backward on this kind of device (tried on a tiny input)."""
    q = torch.zeros(1, 1, 16, 16, device=device_type, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except NotImplementedError:
        return False
    return True


def document_runs(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (b, s) -> run ids (b, s): 0, 1, 2, ... counting contiguous runs of equal doc ids in each row."""
    changes = (doc_ids[:, 1:] != doc_ids[:, :-1]).cumsum(1)
    return torch.cat([torch.zeros_like(doc_ids[:, :1]), changes], 1)


def single_document_rows(doc_ids: torch.Tensor) -> bool:
    return not bool((doc_ids != doc_ids[:, :1]).any())


def causal_horizon(horizon: torch.Tensor | None) -> bool:
    """Whether a row's horizon (b, L) is plain causal attention: every position sees up to itself."""
    return horizon is None or bool((horizon == torch.arange(horizon.shape[1], device=horizon.device)).all())


def query_horizon(doc_ids: torch.Tensor, horizon: torch.Tensor | None, first_query: int, end: int) -> torch.Tensor:
    """The last key position (b, s) each query at positions first_query..end sees."""
    if horizon is None:
        return torch.arange(first_query, end, device=doc_ids.device).expand(doc_ids.shape[0], -1)
    return horizon[:, first_query:end]


def dense_document_mask(doc_ids: torch.Tensor, first_query: int = 0, queries: int | None = None,
                        horizon: torch.Tensor | None = None) -> torch.Tensor:
    """doc_ids (b, L) -> bool (b, 1, s, L) for the s queries at positions first_query.. (default: to the end): query
    i (position first_query + i) sees key j iff same document and j <= its horizon (first_query + i if none)."""
    length = doc_ids.shape[1]
    end = length if queries is None else first_query + queries
    last = query_horizon(doc_ids, horizon, first_query, end)                               # (b, s)
    visible = last[:, :, None] >= torch.arange(length, device=doc_ids.device)[None, None, :]   # (b, s, L)
    same_doc = doc_ids[:, first_query:end, None] == doc_ids[:, None, :]                    # (b, s, L)
    return (same_doc & visible)[:, None]


def _block_spans(length: int, first: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last position (offset by `first`) of each block of BLOCK positions of a span of `length`."""
    starts = torch.arange(0, length, BLOCK, device=device)
    return starts + first, torch.clamp(starts + BLOCK - 1, max=length - 1) + first


def _kv_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool (b, 1, query blocks, key blocks) -> (count (b, 1, q), key-block indices (b, 1, q, k)), listed first."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = blocks.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices


def document_block_mask(doc_ids: torch.Tensor, first_query: int = 0, queries: int | None = None,
                        horizon: torch.Tensor | None = None) -> BlockMask:
    """doc_ids (b, L) -> the BlockMask of `dense_document_mask(doc_ids, first_query, queries, horizon)`, built from
    per-block summaries.

    Work and memory: O(b L + b (L/128)^2). A block pair is computed when a document appears in both blocks and
    some key is within some query's horizon; it runs without mask_mod ("full") when both blocks lie inside one
    document and every key is within every query's horizon.
    """
    runs = document_runs(doc_ids)                                       # (b, L), non-decreasing
    length = doc_ids.shape[1]
    queries = length - first_query if queries is None else queries
    q_lo, q_hi = _block_spans(queries, first_query, doc_ids.device)     # (nq,) absolute positions
    k_lo, k_hi = _block_spans(length, 0, doc_ids.device)                # (nk,)
    q_first, q_last = runs[:, q_lo][:, :, None], runs[:, q_hi][:, :, None]   # (b, nq, 1)
    k_first, k_last = runs[:, k_lo][:, None, :], runs[:, k_hi][:, None, :]   # (b, 1, nk)
    last = query_horizon(doc_ids, horizon, first_query, first_query + queries)  # (b, queries)
    padded = F.pad(last, (0, -queries % BLOCK), value=-1).unflatten(1, (-1, BLOCK))
    h_max = padded.amax(-1)[:, :, None]                                 # (b, nq, 1): the furthest any query sees
    h_min = padded.masked_fill(padded < 0, length).amin(-1)[:, :, None]  # the nearest horizon of a query
    shares_document = torch.maximum(q_first, k_first) <= torch.minimum(q_last, k_last)
    some_key_visible = k_lo[None, None, :] <= h_max
    one_document = (q_first == q_last) & (k_first == k_last) & (q_first == k_first)
    whole_blocks = ((q_hi - q_lo + 1 == BLOCK)[:, None] & (k_hi - k_lo + 1 == BLOCK)[None, :])[None]
    every_key_visible = k_hi[None, None, :] <= h_min
    full = one_document & every_key_visible & whole_blocks
    partial = shares_document & some_key_visible & ~full

    def same_document_causal(b, h, q, kv):
        return (runs[b, q + first_query] == runs[b, kv]) & (last[b, q] >= kv)

    return BlockMask.from_kv_blocks(*_kv_blocks(partial[:, None]), *_kv_blocks(full[:, None]), BLOCK_SIZE=BLOCK,
                                    mask_mod=same_document_causal, seq_lengths=(queries, length))


def document_mask(doc_ids: torch.Tensor, kernel: str, first_query: int = 0, queries: int | None = None,
                  horizon: torch.Tensor | None = None):
    """The mask `attend` takes for the queries at positions first_query.. (all to the end, or `queries` of them:
    a context-parallel rank's part of the row) over all keys of rows `doc_ids` (b, L), with the rows' `horizon`
    (b, L) if any: None (causal: one document per row, every query), a BlockMask (flex) or a dense bool tensor
    (sdpa)."""
    if causal_horizon(horizon):
        horizon = None
    every_query = first_query == 0 and queries in (None, doc_ids.shape[1])
    if every_query and horizon is None and single_document_rows(doc_ids):
        return None
    if kernel == "flex":
        return document_block_mask(doc_ids, first_query, queries, horizon)
    return dense_document_mask(doc_ids, first_query, queries, horizon)


@functools.cache
def _compiled_flex():
    # FlexAttention's fused kernel exists only compiled; inside compiled blocks dynamo inlines this call
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q (b, h, s, hd), k and v (b, g, L, hd), the mask of `document_mask` -> (b, h, s, hd)."""
    if isinstance(mask, BlockMask):
        flex = _compiled_flex() if q.is_cuda else flex_attention  # the CPU runs flex's reference implementation
        return flex(q, k, v, block_mask=mask, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
