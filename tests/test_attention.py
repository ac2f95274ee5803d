"""Attention over packed documents (pretrain/attention.py): Loom's block mask against torch's own construction,
FlexAttention against the dense-mask path in loss and gradients and with the KV cache, and block-mask cost linear
in the row length."""

import time

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from mutations.sitecustomize import flex_backward_on_cpu
from pretrain.attention import BLOCK, document_block_mask, document_runs

RELATIVE = 1e-5  # flex and SDPA sum the same fp32 products in other orders: ~1e-7 relative, 100x margin


def packed_doc_ids(rows: int, length: int, seed: int, max_doc: int = 300) -> torch.Tensor:
    """Rows of documents of random lengths 1..max_doc, as the loader packs them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        lengths = torch.randint(1, max_doc + 1, (length,), generator=g)
        out.append(torch.repeat_interleave(torch.arange(length), lengths)[:length])
    return torch.stack(out)


@pytest.mark.parametrize("length,first_query,queries", [(300, 0, None), (1024, 0, None), (1000, 37, None),
                                                       (700, 650, None), (257, 256, None),
                                                       (1024, 512, 256), (1000, 250, 250), (1024, 0, 512)])
def test_block_mask_equals_torch_create_block_mask(length, first_query, queries):
    """All queries of a row, those after cached keys (first_query), or a context-parallel rank's part (queries)."""
    doc_ids = packed_doc_ids(2, length, seed=length)
    doc_ids[1] = doc_ids[1].flip(0)  # documents need not be numbered in order (generation pads with document 1)
    ours = document_block_mask(doc_ids, first_query, queries)
    runs = document_runs(doc_ids)
    theirs = create_block_mask(lambda b, h, q, kv: (runs[b, q + first_query] == runs[b, kv]) & (q + first_query >= kv),
                               2, None, queries or length - first_query, length, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)  # blocks run without mask_mod alike


def build(attention: str):
    from pretrain.config import ModelConfig, TrainConfig
    from pretrain.model import Transformer
    from pretrain.parallel import tensor_parallel_of

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=200, attention=attention)
    cfg.resolve_preset()
    return Transformer(cfg, tensor_parallel_of(TrainConfig(model=cfg)), seed=0)


@pytest.fixture
def flex_on_cpu(monkeypatch):
    from torch.nn.attention import flex_attention

    monkeypatch.setattr(flex_attention, "_validate_device", flex_attention._validate_device)
    flex_backward_on_cpu()


def test_flex_equals_the_dense_mask_in_loss_and_gradients(groups, flex_on_cpu):
    """Packed rows of 640 tokens (several blocks, documents crossing block edges)."""
    doc_ids = packed_doc_ids(2, 640, seed=1, max_doc=200)
    tokens = torch.randint(0, 200, doc_ids.shape, generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(n) for row in doc_ids for n in torch.unique_consecutive(
        row, return_counts=True)[1].tolist()]).view_as(doc_ids)
    results = {}
    for attention in ("sdpa", "flex"):
        model = build(attention)
        logits = model(tokens, positions, doc_ids)                       # (s, b, v)
        loss = torch.nn.functional.cross_entropy(logits[:-1, :, :200].reshape(-1, 200),
                                                 tokens.T[1:].reshape(-1))
        loss.backward()
        results[attention] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    (loss_sdpa, grads_sdpa), (loss_flex, grads_flex) = results["sdpa"], results["flex"]
    assert abs(loss_flex - loss_sdpa) <= RELATIVE * loss_sdpa
    for name, grad in grads_sdpa.items():
        assert (grads_flex[name] - grad).norm() <= RELATIVE * grad.norm(), name


def test_flex_with_the_kv_cache_equals_a_dense_full_pass(groups):
    """Left-padded prompts (padding is a document of its own), a prefill through flex (forward only: the CPU can
    run it without a gradient) and 5 cached steps against one dense pass over everything. The block mask of
    cached keys (queries after first_query) is checked against torch's above."""
    from pretrain.model import KVCache

    sdpa, flex = build("sdpa").eval(), build("flex").eval()
    cfg = flex.cfg
    lengths, width = [9, 300, 140], 300
    tokens = torch.randint(0, 200, (3, width + 5), generator=torch.Generator().manual_seed(3))
    doc_ids = torch.stack([torch.cat([torch.ones(width - n, dtype=torch.long), torch.zeros(n + 5, dtype=torch.long)])
                           for n in lengths])
    positions = torch.stack([torch.cat([torch.zeros(width - n, dtype=torch.long), torch.arange(n + 5)])
                             for n in lengths])
    with torch.no_grad():
        full = sdpa(tokens, positions, doc_ids)[width - 1:]              # the positions each step predicts from
        cache = KVCache(cfg.n_layers, 3, width + 5, cfg.n_kv_heads, cfg.head_dim, torch.float32, "cpu")
        steps = [flex(tokens[:, :width], positions[:, :width], doc_ids[:, :width], cache)]
        for i in range(width, width + 5):
            steps.append(flex(tokens[:, i:i + 1], positions[:, i:i + 1], doc_ids[:, i:i + 1], cache))
    real = torch.isfinite(full)
    torch.testing.assert_close(torch.cat(steps)[real], full[real], atol=1e-5, rtol=1e-5)


def test_block_mask_cost_is_linear_in_the_row_length():
    """Documents of at most 1024 tokens: the blocks flex computes grow linearly with the row, and so does the time
    to build the mask (a dense mask grows as length^2)."""
    computed, seconds = {}, {}
    for length in (8192, 32768, 131072):
        doc_ids = packed_doc_ids(1, length, seed=4, max_doc=1024)
        started = time.perf_counter()
        mask = document_block_mask(doc_ids)
        seconds[length] = time.perf_counter() - started
        computed[length] = int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())
        assert computed[length] <= (length // BLOCK) * (1024 // BLOCK + 2)  # blocks a query block can share
    print(f"block mask: computed blocks {computed}, seconds {seconds}")
    assert computed[131072] <= 20 * computed[8192]  # 16x the length
