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
    grouped = qkv.view(cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads + 2, cfg.head_dim, cfg.dim)
    q = grouped[:, :-2].reshape(cfg.n_heads * cfg.head_dim, cfg.dim)
    return q, grouped[:, -2].reshape(-1, cfg.dim), grouped[:, -1].reshape(-1, cfg.dim)


def to_hf_state_dict(state: dict, cfg: ModelConfig) -> dict:
    """Loom Transformer state dict (TP=1) -> HF LlamaForCausalLM / ChameleonForConditionalGeneration names."""
    out = {"model.embed_tokens.weight": state["embed.embed.weight"], "model.norm.weight": state["head.norm.weight"],
           "lm_head.weight": state["head.output.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(state[src + "attn.qkv.weight"], cfg)
        out.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                    dst + "self_attn.v_proj.weight": v, dst + "self_attn.o_proj.weight": state[src + "attn.out.weight"],
                    dst + "mlp.gate_proj.weight": state[src + "mlp.gate.weight"],
                    dst + "mlp.up_proj.weight": state[src + "mlp.up.weight"],
                    dst + "mlp.down_proj.weight": state[src + "mlp.down.weight"],
                    dst + "input_layernorm.weight": state[src + "attn_norm.weight"],
                    dst + "post_attention_layernorm.weight": state[src + "mlp_norm.weight"]})
        if cfg.qk_norm:
            for name in ("q_norm", "k_norm"):
                for p in ("weight", "bias"):
                    out[f"{dst}self_attn.{name}.{p}"] = state[f"{src}attn.{name}.{p}"]
    return {k: v.detach().clone() for k, v in out.items()}


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The inverse of split_qkv."""
    per_kv = cfg.n_heads // cfg.n_kv_heads
    grouped = torch.cat([q.view(cfg.n_kv_heads, per_kv, cfg.head_dim, cfg.dim),
                         k.view(cfg.n_kv_heads, 1, cfg.head_dim, cfg.dim),
                         v.view(cfg.n_kv_heads, 1, cfg.head_dim, cfg.dim)], 1)
    return grouped.reshape(-1, cfg.dim)


def from_hf_state_dict(hf: dict, cfg: ModelConfig) -> dict:
    """HF LlamaForCausalLM / Chameleon language-model names -> Loom's canonical state dict."""
    out = {"embed.embed.weight": hf["model.embed_tokens.weight"], "head.norm.weight": hf["model.norm.weight"],
           "head.output.weight": hf["lm_head.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        attn = src + "self_attn."
        out.update({dst + "attn.qkv.weight": fuse_qkv(hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"],
                                                      hf[attn + "v_proj.weight"], cfg),
                    dst + "attn.out.weight": hf[attn + "o_proj.weight"],
                    dst + "mlp.gate.weight": hf[src + "mlp.gate_proj.weight"],
                    dst + "mlp.up.weight": hf[src + "mlp.up_proj.weight"],
                    dst + "mlp.down.weight": hf[src + "mlp.down_proj.weight"],
                    dst + "attn_norm.weight": hf[src + "input_layernorm.weight"],
                    dst + "mlp_norm.weight": hf[src + "post_attention_layernorm.weight"]})
        if cfg.qk_norm:
            for name in ("q_norm", "k_norm"):
                for p in ("weight", "bias"):
                    out[f"{dst}attn.{name}.{p}"] = hf[f"{attn}{name}.{p}"]
    return {k: v.detach().float().clone() for k, v in out.items()}
