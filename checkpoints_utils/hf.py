"""Loom's canonical (TP=1) state dict <-> Hugging Face Llama/Chameleon parameter names.

Loom fuses q, k and v into one matrix grouped by kv head ([q of group 0, k_0, v_0, q of group 1,
...], see pretrain/model.py); HF keeps q_proj, k_proj, v_proj apart. RoPE follows the HF
rotate-half convention in both, so no permutation of q/k rows is needed. The embedding and output
keep their rows as given (padded in Loom); checkpoints_utils.convert trims and pads them.
"""

from __future__ import annotations

import torch

from pretrain.config import ModelConfig


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused qkv weight (rows, dim) or bias (rows,), grouped by kv head, -> q, k, v in HF's layout."""
    rest = qkv.shape[1:]
    grouped = qkv.view(cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads + 2, cfg.head_dim, *rest)
    q = grouped[:, :-2].reshape(cfg.n_heads * cfg.head_dim, *rest)
    return q, grouped[:, -2].reshape(-1, *rest), grouped[:, -1].reshape(-1, *rest)


def name_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(Loom name, HF name) of every parameter but the fused qkv."""
    per_layer = [("attn.out.weight", "self_attn.o_proj.weight"), ("mlp.gate.weight", "mlp.gate_proj.weight"),
                 ("mlp.up.weight", "mlp.up_proj.weight"), ("mlp.down.weight", "mlp.down_proj.weight"),
                 ("attn_norm.weight", "input_layernorm.weight"),
                 ("mlp_norm.weight", "post_attention_layernorm.weight")]
    if cfg.qk_norm:
        per_layer += [(f"attn.{n}.{p}", f"self_attn.{n}.{p}") for n in ("q_norm", "k_norm") for p in ("weight", "bias")]
    pairs = [("embed.embed.weight", "model.embed_tokens.weight"), ("head.norm.weight", "model.norm.weight"),
             ("head.output.weight", "lm_head.weight")]
    for i in range(cfg.n_layers):
        pairs += [(f"blocks.{i}.{ours}", f"model.layers.{i}.{theirs}") for ours, theirs in per_layer]
    return pairs


def to_hf_state_dict(state: dict, cfg: ModelConfig) -> dict:
    """Loom Transformer state dict (TP=1) -> HF LlamaForCausalLM / ChameleonForConditionalGeneration names."""
    out = {theirs: state[ours] for ours, theirs in name_pairs(cfg)}
    for i in range(cfg.n_layers):
        attn = f"model.layers.{i}.self_attn."
        for p in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            q, k, v = split_qkv(state[f"blocks.{i}.attn.qkv.{p}"], cfg)
            out.update({f"{attn}q_proj.{p}": q, f"{attn}k_proj.{p}": k, f"{attn}v_proj.{p}": v})
    return {k: v.detach().clone() for k, v in out.items()}


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The inverse of split_qkv."""
    per_kv = cfg.n_heads // cfg.n_kv_heads
    rest = q.shape[1:]
    grouped = torch.cat([q.view(cfg.n_kv_heads, per_kv, cfg.head_dim, *rest),
                         k.view(cfg.n_kv_heads, 1, cfg.head_dim, *rest),
                         v.view(cfg.n_kv_heads, 1, cfg.head_dim, *rest)], 1)
    return grouped.reshape(-1, *rest)


def from_hf_state_dict(hf: dict, cfg: ModelConfig) -> dict:
    """HF LlamaForCausalLM / Qwen2ForCausalLM / Chameleon language-model names -> Loom's canonical state dict."""
    out = {ours: hf[theirs] for ours, theirs in name_pairs(cfg)}
    for i in range(cfg.n_layers):
        attn = f"model.layers.{i}.self_attn."
        for p in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            out[f"blocks.{i}.attn.qkv.{p}"] = fuse_qkv(*(hf[f"{attn}{n}_proj.{p}"] for n in "qkv"), cfg)
    return {k: v.detach().float().clone() for k, v in out.items()}


VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")
LOOM_VOCAB_ROWS = ("embed.embed.weight", "head.output.weight")  # the same rows under Loom's names


def trim_vocab(hf: dict, vocab_size: int) -> dict:
    """Drop Loom's vocabulary padding rows (HF models have exactly vocab_size rows)."""
    return {k: (v[:vocab_size].clone() if k in VOCAB_ROWS else v) for k, v in hf.items()}


def pad_vocab(state: dict, padded_size: int) -> dict:
    """Zero rows up to Loom's padded vocabulary (their logits are masked to -inf in the model)."""
    def pad(rows):
        return torch.cat([rows, rows.new_zeros(padded_size - rows.shape[0], rows.shape[1])])
    return {k: (pad(v) if k in LOOM_VOCAB_ROWS else v) for k, v in state.items()}


def grow_vocab(state: dict, text_size: int, vocab_size: int, noise: float = 0.01, seed: int = 0) -> dict:
    """Embedding and output rows for a vocabulary of `vocab_size` ids whose first `text_size` are the imported
    model's tokenizer's: those rows are kept; every later row (Loom's specials, the visual codes, and any rows the
    model had past its tokenizer, such as Qwen2's padding) becomes the mean of the kept rows plus
    N(0, (noise x their standard deviation)^2) per dimension. The mean (Hewitt 2021, "Initializing New Word
    Embeddings for Pretrained Language Models") bounds how far the new output rows move the model's distribution:
    by Jensen, exp(h . mean) is at most the mean of the old exp(h . e_i), so no new token starts out dominating;
    the noise makes the new rows differ. Logits of the old ids are unchanged."""
    generator = torch.Generator().manual_seed(seed)
    out = dict(state)
    for name in LOOM_VOCAB_ROWS:
        old = state[name][:text_size]
        fresh = old.mean(0) + noise * old.std(0) * torch.randn(vocab_size - text_size, old.shape[1],
                                                              generator=generator)
        out[name] = torch.cat([old, fresh.to(old.dtype)])
    return out
