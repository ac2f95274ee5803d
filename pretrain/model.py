"""The unified decoder-only transformer (DESIGN §4), built from megatron-core tensor-parallel layers.

Llama-like: RMSNorm, RoPE, SwiGLU, grouped-query attention, untied embeddings, no biases (model.qkv_bias: Qwen2's
biases on q, k and v). The
chameleon preset adds qk-norm (LayerNorm with bias over head_dim, per head), swin-norm and z-loss.

Tensors are sequence-first, megatron's convention: s = sequence, b = batch, d = model width,
h = local heads (n_heads / TP), g = local kv heads, hd = head_dim, v = local vocabulary shard.
Every module is handed `tp`: megatron's layer config and the tensor-parallel process group the megatron
layers split themselves along (and the source of the TP size and rank used here, e.g. for the local
heads); this file has no other parallel code. The loss over the vocabulary shards is pretrain/loss.py.
Weights are initialised on the CPU as whole matrices and then split (megatron's
`use_cpu_initialization`), so every layout starts from the same model for the same seed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from .attention import attend, document_mask, kernel_for
from .config import ModelConfig


@dataclass(frozen=True)
class TensorParallel:
    """What the model is built for: megatron's layer config, the tensor-parallel group, and the context-parallel
    group over which each row's sequence is split (None: every rank holds whole rows)."""

    config: ModelParallelConfig
    group: dist.ProcessGroup
    context_group: dist.ProcessGroup | None = None

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # parallelize() swaps this for a TP all-reduce of the gradient under sequence parallelism,
        # where each TP rank normalises only its part of the sequence
        self.weight_fn = identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return normed * self.weight_fn(self.weight)


class HeadLayerNorm(nn.Module):
    """Chameleon's qk-norm: LayerNorm over head_dim with a separate weight and bias per head.

    Holds the rows of the local heads; TP shards it along the head dimension like the attention.
    """

    def __init__(self, local_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(local_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(local_heads, head_dim))
        for p in (self.weight, self.bias):
            tensor_parallel.set_tensor_model_parallel_attributes(p, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., heads, hd)
        x = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x)
        return x * self.weight + self.bias


def is_norm(parameter_name: str) -> bool:
    """RMSNorm weights and the qk LayerNorm's weights and biases (all named *norm*): no weight decay, and they
    train while optimizer.freeze_steps holds the rest."""
    return "norm" in parameter_name


def llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.x's RoPE scaling (transformers' rope_type 'llama3'): wavelengths longer than the original context /
    low_freq_factor are stretched by `factor`, shorter than context / high_freq_factor kept, those between blended."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (b, s) -> cos, sin (b, 1, s, hd), the Llama/HF convention (halves, not pairs); `scaling`: Llama
    3.x's frequency scaling (model.rope_scaling)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
                               / head_dim)
    if scaling:
        inv_freq = llama3_frequencies(inv_freq, scaling)
    freqs = positions.float()[..., None] * inv_freq                    # (b, s, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]                   # (b, 1, s, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class KVCache:
    """Keys and values of the tokens seen so far, for incremental decoding (pretrain/generate.py).

    Per layer (b, g, max_len, hd), RoPE already applied. It also keeps the doc ids of the cached
    tokens, so the document-causal mask covers left padding: a prompt's padding is a document of
    its own that no real token attends to.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.doc_ids = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.horizon = torch.arange(max_len, device=device).repeat(batch, 1)
        self.start = self.length = 0

    def extend(self, doc_ids: torch.Tensor, kernel: str, horizon: torch.Tensor | None = None):
        """Append s tokens (doc_ids (b, s); horizon (b, s): the last cache index each sees, for a block of
        next-scale codes, default itself); returns their mask over all cached keys (pretrain/attention.py).

        The prefill takes `kernel`; later steps take a dense (b, 1, s, length) mask, linear in the length: the
        compiled flex kernel is specialised to its shapes and would recompile at every new length."""
        s = doc_ids.shape[1]
        self.start, self.length = self.length, self.length + s
        self.doc_ids[:, self.start:self.length] = doc_ids
        if horizon is not None:
            self.horizon[:, self.start:self.length] = horizon
        return document_mask(self.doc_ids[:, :self.length], kernel if self.start == 0 else "sdpa",
                             first_query=self.start, horizon=self.horizon[:, :self.length])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' k, v (b, g, s, hd) of `layer`; returns all of them (b, g, length, hd)."""
        self.keys[layer][:, :, self.start:self.length] = k
        self.values[layer][:, :, self.start:self.length] = v
        return self.keys[layer][:, :, :self.length], self.values[layer][:, :, :self.length]


def gather_row(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(b, g, s/cp, hd) keys or values of this context-parallel rank's part -> (b, g, s, hd) of the whole row; the
    backward sums the gradients of every rank's queries into each part (a reduce-scatter)."""
    whole = tensor_parallel.gather_from_sequence_parallel_region(t.permute(2, 0, 1, 3).contiguous(), True, group)
    return whole.permute(1, 2, 0, 3)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, init, out_init):
        super().__init__()
        self.context_group = tp.context_group
        self.head_dim, self.q_per_kv = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
        self.local_kv = cfg.n_kv_heads // tp.size
        # Fused QKV, grouped by kv head: [q of group 0, k_0, v_0, q of group 1, ...], so a
        # contiguous TP split hands each rank whole groups whatever the TP size.
        self.qkv = tensor_parallel.ColumnParallelLinear(
            cfg.dim, cfg.n_kv_heads * (self.q_per_kv + 2) * cfg.head_dim, config=tp.config, init_method=init,
            bias=cfg.qkv_bias, gather_output=False, tp_group=tp.group)  # a bias starts at zero
        self.out = tensor_parallel.RowParallelLinear(
            cfg.n_heads * cfg.head_dim, cfg.dim, config=tp.config, init_method=out_init, bias=False,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp.group)
        self.q_norm = HeadLayerNorm(self.local_kv * self.q_per_kv, cfg.head_dim, cfg.norm_eps) \
            if cfg.qk_norm else None
        self.k_norm = HeadLayerNorm(self.local_kv, cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask,
                cache: tuple[KVCache, int] | None = None) -> torch.Tensor:
        qkv, _ = self.qkv(x)                   # (s, b, g*(q_per_kv+2)*hd); gathers the sequence under SP
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.local_kv, self.q_per_kv + 2, self.head_dim)
        q = qkv[:, :, :, :self.q_per_kv].reshape(s, b, -1, self.head_dim)   # (s, b, h, hd)
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]                         # (s, b, g, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))              # (b, heads, s, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.context_group is not None:                                # keys/values (b, g, s * cp, hd)
            k, v = gather_row(k, self.context_group), gather_row(v, self.context_group)
        if cache is not None:                                             # keys/values (b, g, cached s, hd)
            k, v = cache[0].update(cache[1], k, v)
        y = attend(q, k, v, mask)                                          # (b, h, s, hd)
        y = y.permute(2, 0, 1, 3).reshape(s, b, -1)                        # (s, b, h*hd)
        out, _ = self.out(y)                   # (s, b, d) summed over TP; (s/tp, b, d) scattered under SP
        return out


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, init, out_init):
        super().__init__()
        # gate and up are separate column-parallel layers: a fused [gate; up] matrix would mean a
        # different function for each TP size.
        self.gate = tensor_parallel.ColumnParallelLinear(cfg.dim, cfg.ffn_dim, config=tp.config, init_method=init,
                                                         bias=False, gather_output=False, tp_group=tp.group)
        self.up = tensor_parallel.ColumnParallelLinear(cfg.dim, cfg.ffn_dim, config=tp.config, init_method=init,
                                                       bias=False, gather_output=False, tp_group=tp.group)
        self.down = tensor_parallel.RowParallelLinear(cfg.ffn_dim, cfg.dim, config=tp.config, init_method=out_init,
                                                      bias=False, input_is_parallel=True, skip_bias_add=False,
                                                      tp_group=tp.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                   # x: (s, b, d)
        gate, _ = self.gate(x)                                             # (s, b, ffn/tp)
        up, _ = self.up(x)
        out, _ = self.down(F.silu(gate) * up)                              # (s, b, d)
        return out


@contextlib.contextmanager
def layer_seed(seed: int, layer: int):
    """Initialise layer `layer` from its own seed: the same weights whichever ranks build which layers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + layer)
        yield


def init_methods(cfg: ModelConfig):
    """(init of input projections, init of the projections that write into the residual stream).

    Residual writes are scaled by 1/sqrt(2 n_layers) (GPT-2); not under swin-norm, which normalises
    them anyway: there a small output would only make the norm's backward ill-conditioned.
    """
    std = cfg.init_std
    out_std = std if cfg.swin_norm else std / math.sqrt(2 * cfg.n_layers)
    return lambda w: nn.init.normal_(w, 0.0, std), lambda w: nn.init.normal_(w, 0.0, out_std)


class Embedding(nn.Module):
    """Layer 0: token ids (b, s) -> hidden states (s, b, d), or (s/tp, b, d) under SP."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int):
        super().__init__()
        with layer_seed(seed, 0):
            self.embed = tensor_parallel.VocabParallelEmbedding(
                cfg.padded_vocab_size, cfg.dim, config=tp.config, init_method=init_methods(cfg)[0],
                reduce_scatter_embeddings=tp.config.sequence_parallel, tp_group=tp.group)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        return x if self.embed.reduce_scatter_embeddings else x.transpose(0, 1).contiguous()


class Block(nn.Module):
    """Layer i (1..n_layers): one transformer block."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int, layer: int):
        super().__init__()
        with layer_seed(seed, layer):
            init, out_init = init_methods(cfg)
            self.swin_norm = cfg.swin_norm
            self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.attn = Attention(cfg, tp, init, out_init)
            self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.mlp = SwiGLU(cfg, tp, init, out_init)

    def forward(self, x, cos, sin, mask, cache: tuple[KVCache, int] | None = None):  # x: (s, b, d)
        if self.swin_norm:  # Chameleon: normalise each sublayer's output before the residual add
            h = x + self.attn_norm(self.attn(x, cos, sin, mask, cache))
            return h + self.mlp_norm(self.mlp(h))
        h = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return h + self.mlp(self.mlp_norm(h))


class Head(nn.Module):
    """Layer n_layers + 1: final norm and output projection -> logits of the local vocabulary shard.

    The padding rows of the vocabulary get -inf logits: the model is a distribution over the real
    vocabulary only, as the exported Hugging Face model (which has no padding rows) is."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int):
        super().__init__()
        with layer_seed(seed, cfg.n_layers + 1):
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = tensor_parallel.ColumnParallelLinear(
                cfg.dim, cfg.padded_vocab_size, config=tp.config, init_method=init_methods(cfg)[0], bias=False,
                gather_output=False, tp_group=tp.group)
        local = cfg.padded_vocab_size // tp.size
        self.first_row = tp.rank * local  # the id of this rank's first output row
        rows = torch.arange(self.first_row, self.first_row + local)
        self.register_buffer("padding", rows >= cfg.vocab_size, persistent=False)
        self.has_padding = bool(self.padding.any())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output(self.norm(x))                              # (s, b, v); gathers SP
        return logits.masked_fill(self.padding, float("-inf")) if self.has_padding else logits


def attention_inputs(positions: torch.Tensor, doc_ids: torch.Tensor, cfg: ModelConfig, first_query: int = 0,
                     horizon: torch.Tensor | None = None):
    """RoPE tables of the queries' positions (b, s) and their document-causal mask over the keys of rows doc_ids
    (b, L) (block-causal where the rows' horizon (b, L) reaches past a position), for the kernel cfg.attention
    means here. Under context parallelism s < L: the queries are positions first_query .. first_query + s."""
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    kernel = kernel_for(cfg.attention, doc_ids.device)
    return cos, sin, document_mask(doc_ids, kernel, first_query, positions.shape[1], horizon)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int):
        super().__init__()
        self.cfg, self.context_group = cfg, tp.context_group
        self.embed = Embedding(cfg, tp, seed)
        self.blocks = nn.ModuleList(Block(cfg, tp, seed, i + 1) for i in range(cfg.n_layers))
        self.head = Head(cfg, tp, seed)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor,
                cache: KVCache | None = None, horizon: torch.Tensor | None = None, last: int = 1) -> torch.Tensor:
        """tokens, positions, doc_ids (b, s) -> logits of the local vocabulary shard (s, b, v); horizon (b, s), if
        given, is the last position each position sees (the loader's, for next-scale blocks; with a cache, cache
        indices of the new tokens).

        Under context parallelism tokens and positions are this rank's part of each row (b, s/cp), the part at
        its rank in the group, and doc_ids and horizon the whole rows (b, s).

        With a cache, the tokens continue the cached ones and attend to them too, and only the `last` positions'
        logits are computed (last, b, v): a long prompt's would not fit with a large vocabulary."""
        x = self.embed(tokens)
        if cache is None:
            first = 0 if self.context_group is None else dist.get_rank(self.context_group) * tokens.shape[1]
            cos, sin, mask = attention_inputs(positions, doc_ids, self.cfg, first, horizon)
        else:
            cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
            mask = cache.extend(doc_ids, kernel_for(self.cfg.attention, doc_ids.device), horizon)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, None if cache is None else (cache, i))
        return self.head(x if cache is None else x[-last:])
