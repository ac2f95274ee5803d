"""Import of directories made by transformers itself (not Loom's own exports): random tiny Llama, Chameleon
and Emu3 models built here, saved with save_pretrained, imported by `loom convert from-hf`; Loom's logits
on the imported checkpoint equal transformers' (fp32, 1e-4). Configs Loom's model cannot express are
refused, naming the setting."""

import pytest
import torch

from conftest import run_loom
from test_convert import loom_logits

TOL = 1e-4
TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)


def llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**TEXT, **overrides}))


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # wavelengths 6-3e5: all 3 cases


def llama3():
    return llama(rope_parameters=LLAMA3_ROPE)


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**TEXT))


def chameleon():
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vq = dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
              attn_resolutions=[], resolution=32, latent_channels=8)
    return ChameleonForConditionalGeneration(ChameleonConfig(**TEXT, swin_norm=True, vq_config=vq,
                                                             vocabulary_map={"<image>": 299}))


def emu3():
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    vq = dict(codebook_size=16, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2],
              num_res_blocks=1, attn_resolutions=[], hidden_size=16, temporal_downsample_factor=1)
    vocabulary_map = {f"<|visual token {i:06d}|>": 280 + i for i in range(16)} | {"<image>": 299}
    text = {**TEXT, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return Emu3ForConditionalGeneration(Emu3Config(text_config=text, vq_config=vq, vocabulary_map=vocabulary_map))


@pytest.mark.parametrize("make", [llama, llama3, qwen2, chameleon, emu3],
                         ids=["llama", "llama3-rope", "qwen2", "chameleon", "emu3"])
def test_a_transformers_made_model_imports_with_equal_logits(make, tmp_path, groups):
    torch.manual_seed(0)
    hf = make().eval()
    with torch.no_grad():  # random weights of a realistic spread, norms included (their default is all ones)
        for name, p in hf.named_parameters():
            if "vqmodel" not in name:
                p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.05) + (1.0 if p.ndim == 1 else 0.0))
    hf.save_pretrained(tmp_path / "hf")
    result = run_loom("convert", "from-hf", tmp_path / "hf", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    ids = torch.randint(0, 299, (48,))
    with torch.no_grad():
        theirs = hf(input_ids=ids[None]).logits
    assert (theirs - loom_logits(tmp_path / "run", ids)).abs().max() <= TOL
    if make in (llama3, qwen2):  # and back: the exported config keeps rope scaling and biases, same logits
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

        from checkpoints_utils.convert import text_config
        from checkpoints_utils.hf import to_hf_state_dict, trim_vocab
        from checkpoints_utils.reader import read_checkpoint, resolve_checkpoint
        from data_pipeline.vocab import SPECIAL_TOKENS, Vocabulary

        params, cfg, _ = read_checkpoint(resolve_checkpoint(tmp_path / "run"))
        kw = text_config(cfg.model, Vocabulary(300 - len(SPECIAL_TOKENS), 0), 256)
        if make is llama3:
            assert kw["rope_parameters"] == LLAMA3_ROPE
            back = LlamaForCausalLM(LlamaConfig(**kw))
        else:
            assert cfg.model.qkv_bias and params["blocks.0.attn.qkv.bias"].abs().max() > 0
            back = Qwen2ForCausalLM(Qwen2Config(**kw))
        back.load_state_dict(trim_vocab(to_hf_state_dict(params, cfg.model), 300))
        with torch.no_grad():
            assert (back.eval()(input_ids=ids[None]).logits - theirs).abs().max() <= TOL


@pytest.mark.parametrize("overrides,named", [
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=True"),
    ({"hidden_act": "gelu"}, "hidden_act=gelu"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type=linear"),
    ({"use_sliding_window": True}, "use_sliding_window=True"),
])
def test_configs_loom_cannot_express_are_refused_by_name(overrides, named, tmp_path):
    from checkpoints_utils.convert import import_hf
    from checkpoints_utils.reader import CheckpointError

    llama(**overrides).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=f"this llama model uses .*{named}.*which Loom's model does not have"):
        import_hf(tmp_path / "hf", tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run").exists()  # nothing half-written
