"""Attention over packed documents: the document-causal mask, and the kernel that takes it.

A token sees the earlier tokens of its own document, a contiguous run of equal doc ids in a row.
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


def dense_document_mask(doc_ids: torch.Tensor, first_query: int = 0, queries: int | None = None) -> torch.Tensor:
    """doc_ids (b, L) -> bool (b, 1, s, L) for the s queries at positions first_query.. (default: to the end): query
    i (position first_query + i) sees key j iff same document and j <= first_query + i."""
    length = doc_ids.shape[1]
    end = length if queries is None else first_query + queries
    query_pos = torch.arange(first_query, end, device=doc_ids.device)
    causal = query_pos[:, None] >= torch.arange(length, device=doc_ids.device)[None, :]     # (s, L)
    same_doc = doc_ids[:, first_query:end, None] == doc_ids[:, None, :]                    # (b, s, L)
    return (same_doc & causal)[:, None]


def _block_spans(length: int, first: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last position (offset by `first`) of each block of BLOCK positions of a span of `length`."""
    starts = torch.arange(0, length, BLOCK, device=device)
    return starts + first, torch.clamp(starts + BLOCK - 1, max=length - 1) + first


def _kv_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool (b, 1, query blocks, key blocks) -> (count (b, 1, q), key-block indices (b, 1, q, k)), listed first."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = blocks.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices


def document_block_mask(doc_ids: torch.Tensor, first_query: int = 0, queries: int | None = None) -> BlockMask:
    """doc_ids (b, L) -> the BlockMask of `dense_document_mask(doc_ids, first_query, queries)`, built from per-block
    summaries.

    Work and memory: O(b L + b (L/128)^2). A block pair is computed when a document appears in both blocks and
    some key precedes some query; it runs without mask_mod ("full") when both blocks lie inside one document and
    every key precedes every query.
    """
    runs = document_runs(doc_ids)                                       # (b, L), non-decreasing
    length = doc_ids.shape[1]
    queries = length - first_query if queries is None else queries
    q_lo, q_hi = _block_spans(queries, first_query, doc_ids.device)     # (nq,) absolute positions
    k_lo, k_hi = _block_spans(length, 0, doc_ids.device)                # (nk,)
    q_first, q_last = runs[:, q_lo][:, :, None], runs[:, q_hi][:, :, None]   # (b, nq, 1)
    k_first, k_last = runs[:, k_lo][:, None, :], runs[:, k_hi][:, None, :]   # (b, 1, nk)
    shares_document = torch.maximum(q_first, k_first) <= torch.minimum(q_last, k_last)
    some_key_first = (k_lo[None, :] <= q_hi[:, None])[None]
    one_document = (q_first == q_last) & (k_first == k_last) & (q_first == k_first)
    whole_blocks = ((q_hi - q_lo + 1 == BLOCK)[:, None] & (k_hi - k_lo + 1 == BLOCK)[None, :])[None]
    every_key_first = (k_hi[None, :] <= q_lo[:, None])[None]
    full = one_document & every_key_first & whole_blocks
    partial = shares_document & some_key_first & ~full

    def same_document_causal(b, h, q, kv):
        return (runs[b, q + first_query] == runs[b, kv]) & (q + first_query >= kv)

    return BlockMask.from_kv_blocks(*_kv_blocks(partial[:, None]), *_kv_blocks(full[:, None]), BLOCK_SIZE=BLOCK,
                                    mask_mod=same_document_causal, seq_lengths=(queries, length))


def document_mask(doc_ids: torch.Tensor, kernel: str, first_query: int = 0, queries: int | None = None):
    """The mask `attend` takes for the queries at positions first_query.. (all to the end, or `queries` of them:
    a context-parallel rank's part of the row) over all keys of rows `doc_ids` (b, L): None (causal: one document
    per row, every query), a BlockMask (flex) or a dense bool tensor (sdpa)."""
    every_query = first_query == 0 and queries in (None, doc_ids.shape[1])
    if every_query and single_document_rows(doc_ids):
        return None
    if kernel == "flex":
        return document_block_mask(doc_ids, first_query, queries)
    return dense_document_mask(doc_ids, first_query, queries)


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
