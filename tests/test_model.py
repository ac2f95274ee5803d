import math

import torch

from pretrain.config import ModelConfig


def build(preset="emu3", **kw):
    from pretrain.model import Transformer
    from pretrain.parallel import tensor_parallel_of
    from pretrain.config import TrainConfig

    cfg = ModelConfig(preset=preset, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=200, **kw)
    cfg.resolve_preset()
    return Transformer(cfg, tensor_parallel_of(TrainConfig(model=cfg)), seed=0), cfg


def test_logits_shape_and_padded_vocab(groups):
    model, cfg = build()
    assert cfg.padded_vocab_size == 256
    tokens = torch.randint(0, 200, (3, 10))
    logits = model(tokens, torch.arange(10).expand(3, 10), torch.zeros(3, 10, dtype=torch.long))
    assert logits.shape == (10, 3, 256)
    assert torch.isinf(logits[..., 200:]).all() and torch.isfinite(logits[..., :200]).all()  # padding masked


def test_document_mask_isolates_packed_documents(groups):
    """Two documents packed in one row give the same logits as each document alone."""
    model, _ = build()
    a, b = torch.randint(0, 200, (1, 7)), torch.randint(0, 200, (1, 5))
    packed = model(torch.cat([a, b], 1), torch.cat([torch.arange(7), torch.arange(5)])[None],
                   torch.tensor([[0] * 7 + [1] * 5]))
    alone_a = model(a, torch.arange(7)[None], torch.zeros(1, 7, dtype=torch.long))
    alone_b = model(b, torch.arange(5)[None], torch.zeros(1, 5, dtype=torch.long))
    torch.testing.assert_close(packed[:7], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[7:], alone_b, atol=1e-5, rtol=1e-5)


def test_loss_per_kind_and_z_loss(groups):
    from pretrain.loss import lm_loss, vocab_parallel_logsumexp

    logits = torch.randn(6, 2, 256, requires_grad=True)
    torch.testing.assert_close(vocab_parallel_logsumexp(logits), torch.logsumexp(logits, -1))
    targets = torch.randint(0, 200, (2, 6))
    kinds = torch.tensor([[1, 1, 2, 2, 0, 3], [4, 1, 1, 0, 0, 2]])
    loss, sums = lm_loss(logits, targets, kinds, z_loss=0.0)
    ce = torch.nn.functional.cross_entropy(logits.transpose(0, 1).reshape(-1, 256), targets.reshape(-1),
                                           reduction="none").view(2, 6)
    torch.testing.assert_close(loss, ce[kinds > 0].mean())
    torch.testing.assert_close(sums[0, 2], ce[kinds == 2].sum())
    assert sums[1].tolist()[:5] == [3, 4, 3, 1, 1] and not sums[1, 5:].any()  # no next-scale map kinds
    with_z, _ = lm_loss(logits, targets, kinds, z_loss=1e-2)
    z = torch.logsumexp(logits.transpose(0, 1), -1)[kinds > 0].pow(2).mean()
    reference = ce[kinds > 0].mean() + 1e-2 * z
    torch.testing.assert_close(with_z, reference)
    ours_grad, = torch.autograd.grad(with_z, logits)
    ref_grad, = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(ours_grad, ref_grad)


def test_loss_weights_of_zero_take_a_kind_out_of_the_gradient(groups):
    """loss.weights {text: 0}: no gradient reaches the logits of text positions, the loss is the mean over the
    other positions, the logged per-kind sums stay unweighted; weights of 1 give the unweighted loss bit for bit."""
    from pretrain.loss import lm_loss

    logits = torch.randn(6, 2, 256, requires_grad=True)
    targets = torch.randint(0, 200, (2, 6))
    kinds = torch.tensor([[1, 1, 2, 2, 0, 3], [4, 1, 1, 0, 0, 2]])
    plain, plain_sums = lm_loss(logits, targets, kinds, z_loss=1e-2)
    ones, ones_sums = lm_loss(logits, targets, kinds, z_loss=1e-2, kind_weights=(0.0, 1.0, 1.0, 1.0, 1.0))
    assert torch.equal(plain, ones) and torch.equal(plain_sums, ones_sums)
    loss, sums = lm_loss(logits, targets, kinds, z_loss=1e-2, kind_weights=(0.0, 0.0, 1.0, 1.0, 1.0))
    grad, = torch.autograd.grad(loss, logits)
    text = (kinds == 1).t()  # (s, b) as the logits
    assert grad[text].abs().max() == 0 and grad[(kinds > 1).t()].abs().min() > 0
    ce = torch.nn.functional.cross_entropy(logits.transpose(0, 1).reshape(-1, 256), targets.reshape(-1),
                                           reduction="none").view(2, 6)
    z = torch.logsumexp(logits.transpose(0, 1), -1).pow(2)
    torch.testing.assert_close(loss, (ce + 1e-2 * z)[kinds > 1].mean())
    assert torch.equal(sums, plain_sums)
    half, _ = lm_loss(logits, targets, kinds, z_loss=0.0, kind_weights=(0.0, 0.5, 1.0, 1.0, 1.0))
    w = torch.where(kinds == 1, 0.5, (kinds > 0).float())
    torch.testing.assert_close(half, (ce * w).sum() / w.sum())


def hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(input_ids=tokens).logits


def test_emu3_preset_matches_transformers_llama(groups):
    from transformers import LlamaConfig, LlamaForCausalLM

    from checkpoints_utils.hf import to_hf_state_dict, trim_vocab

    model, cfg = build("emu3")
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        attn_implementation="eager")).eval()
    hf.load_state_dict(trim_vocab(to_hf_state_dict(model.state_dict(), cfg), cfg.vocab_size), strict=True)
    tokens = torch.randint(0, 200, (2, 12))
    ours = model(tokens, torch.arange(12).expand(2, 12), torch.zeros(2, 12, dtype=torch.long)).transpose(0, 1)
    torch.testing.assert_close(ours[..., :cfg.vocab_size], hf_logits(hf, tokens), atol=2e-5, rtol=1e-4)


def test_chameleon_preset_matches_transformers_chameleon(groups):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from checkpoints_utils.hf import to_hf_state_dict, trim_vocab

    model, cfg = build("chameleon")
    with torch.no_grad():  # non-trivial qk-norm parameters, so a wrong mapping cannot pass
        for block in model.blocks:
            for norm in (block.attn.q_norm, block.attn.k_norm):
                norm.weight.normal_(1.0, 0.2)
                norm.bias.normal_(0.0, 0.2)
    hf = ChameleonForConditionalGeneration(ChameleonConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        swin_norm=True, vocabulary_map={"<image>": cfg.vocab_size - 1},
        vq_config={"embed_dim": 8, "num_embeddings": 16, "latent_channels": 8, "base_channels": 32,
                   "channel_multiplier": [1, 2], "resolution": 32, "num_res_blocks": 1},
        attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict(trim_vocab(to_hf_state_dict(model.state_dict(), cfg), cfg.vocab_size),
                                          strict=False)
    assert not unexpected and all(k.startswith("model.vqmodel") for k in missing)
    tokens = torch.randint(0, 200, (2, 12))
    ours = model(tokens, torch.arange(12).expand(2, 12), torch.zeros(2, 12, dtype=torch.long)).transpose(0, 1)
    torch.testing.assert_close(ours[..., :cfg.vocab_size], hf_logits(hf, tokens), atol=2e-5, rtol=1e-4)


def test_initial_loss_is_near_uniform(groups):
    from pretrain.loss import lm_loss

    model, cfg = build()
    tokens = torch.randint(0, 200, (2, 32))
    logits = model(tokens, torch.arange(32).expand(2, 32), torch.zeros(2, 32, dtype=torch.long))
    loss, _ = lm_loss(logits, tokens.roll(-1, 1), torch.ones_like(tokens), 0.0)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1  # padding rows are masked out
