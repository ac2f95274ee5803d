"""`loom convert`: Loom checkpoints (any layout) <-> Hugging Face transformers directories.

Export formats:
    emu3       Emu3ForConditionalGeneration: the language model + Loom's visual tokenizer (an Emu3VQVAE),
               the tokenizer and an Emu3Processor, so transformers can generate images end to end
    chameleon  ChameleonForConditionalGeneration (chameleon preset: qk-norm with bias per head,
               swin-norm); its VQ is another architecture than Loom's, so it is left untrained
    llama      LlamaForCausalLM: the language model alone (emu3 preset)
    qwen2      Qwen2ForCausalLM: the language model alone (emu3 preset; q/k/v biases, zero without model.qkv_bias)
Every export carries a tokenizer with Loom's vocabulary: the text tokenizer's ids (sentencepiece pieces, or a
transformers tokenizer's own vocabulary), then the special tokens, then one token per visual code (DESIGN §2), at
the ids Loom trains with.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data_pipeline.text_tokenizer import stored_text_tokenizer
from data_pipeline.vocab import MAIN_PART, TEXT_ENCODING, Vocabulary, fingerprint
from common.checkpoint_folders import CheckpointError
from common.config import dump_yaml
from pretrain.config import LLAMA3_ROPE_KEYS, ModelConfig, SourceConfig, TrainConfig
from .reader import read_checkpoint, resolve_checkpoint, write_portable_checkpoint
from .hf import from_hf_state_dict, grow_vocab, pad_vocab, to_hf_state_dict, trim_vocab

FORMATS = ("emu3", "chameleon", "llama", "qwen2")
# Emu3's modeling code finds the row end and the image placeholder under these names
EMU3_EOL, EMU3_IMAGE = "<|extra_200|>", "<image>"
IMAGE_PLACEHOLDER = "<|reserved 0|>"  # Loom's data never uses it; the exported processor does


def check_format(m: ModelConfig, fmt: str) -> None:
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if m.qkv_bias and fmt != "qwen2":
        raise CheckpointError(f"this checkpoint has q/k/v biases (model.qkv_bias) and the {fmt} format has none; "
                              f"export it with --format qwen2")
    if fmt in ("emu3", "llama", "qwen2") and (m.qk_norm or m.swin_norm):
        cls = {"emu3": "Emu3ForConditionalGeneration", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[fmt]
        raise CheckpointError(f"this checkpoint uses qk-norm/swin-norm (the chameleon preset) and {cls} has "
                              f"neither; export it with --format chameleon")
    if fmt == "chameleon" and not m.qk_norm:
        raise CheckpointError("ChameleonForConditionalGeneration always applies a per-head qk LayerNorm and this "
                              "checkpoint (emu3 preset) has none; export it with --format emu3 or llama")


def data_vocabulary(cfg: TrainConfig, data: str | Path | None) -> tuple[Path, dict]:
    """A token directory (`data`, else the run's first data source) and its vocab.json."""
    for path in [data] if data else [s.path for s in cfg.data.sources.values()]:
        vocab_file = Path(path) / "vocab.json"
        if vocab_file.exists():
            return Path(path), json.loads(vocab_file.read_text())
    raise CheckpointError(f"no vocab.json in {data or 'the checkpoint data sources (config.yaml data.sources)'}: "
                          f"pass --data TOKEN_DIR, a directory written by `loom data tokenize`, for the tokenizer")


def locate_visual_tokenizer(vocab: dict, data_dir: Path, vocabulary: Vocabulary, shared: dict,
                            override: str | Path | None) -> Path:
    """The visual tokenizer of the data's part (`override`, else the one vocab.json records), checked against the
    fingerprint the checkpoint was trained on (imported weights have none: nothing to check). The fingerprint of a
    vocabulary of several visual tokenizers hashes them all: the other parts' are those vocab.json records."""
    vq_dir = Path(override or vocab.get("visual_tokenizer") or "")
    if not (vq_dir / "config.json").exists():
        raise CheckpointError(f"visual tokenizer not found at {vq_dir}; pass --visual-tokenizer DIR")
    trained_on = shared.get("fingerprint")
    text_model = stored_text_tokenizer(data_dir)
    hashed = [Path(d) for d in vocab.get("visual_tokenizers", [vq_dir])]
    hashed[[p.name for p in vocabulary.parts].index(vocab.get("visual", MAIN_PART))] = vq_dir
    if trained_on and fingerprint(vocabulary, text_model, hashed) != trained_on:
        raise CheckpointError(f"{vq_dir} with {text_model} is not what this model was trained "
                              f"with (vocabulary fingerprint {trained_on}: the vocabulary, the text encoding "
                              f"({TEXT_ENCODING}) and both tokenizers' files); pass --visual-tokenizer DIR, or "
                              f"retokenize and retrain with this Loom if the model predates its text encoding")
    return vq_dir


def build_tokenizer(text_model: Path, vocabulary: Vocabulary):
    """A transformers tokenizer equal to the text tokenizer on text (sentencepiece's pieces, or the transformers
    tokenizer itself), with Loom's specials and visual tokens after its last id."""
    from tokenizers import AddedToken
    from tokenizers.models import BPE
    from transformers import AutoTokenizer, LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    specials = list(vocabulary.special_tokens)
    if text_model.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(text_model)
    else:
        pieces = SentencePieceExtractor(str(text_model)).extract(BPE)
        tokenizer = LlamaTokenizer(vocab=pieces["vocab"], merges=pieces["merges"], unk_token="<unk>",
                                   bos_token=specials[0], eos_token=specials[1], pad_token=specials[2],
                                   add_bos_token=False, add_prefix_space=False)  # as Loom encodes a text segment
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tokenizer.add_tokens([AddedToken(f"<|visual token {i:06d}|>", special=True, normalized=False)
                          for i in range(vocabulary.codebook_size)], special_tokens=True)
    last_code = f"<|visual token {vocabulary.codebook_size - 1:06d}|>"
    ids = tokenizer.convert_tokens_to_ids([specials[0], specials[-1], last_code])
    v = vocabulary
    if ids != [v.text_size, v.text_size + len(specials) - 1, v.size - 1] or len(tokenizer) != v.size:
        raise CheckpointError(f"{text_model}: the tokenizer's ids do not follow Loom's layout ({ids}, {len(tokenizer)} "
                              f"tokens for a layout of {vocabulary.size})")
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = tokenizer.convert_ids_to_tokens(
        [v.bos, v.eos, v.special("<|pad|>")])
    return tokenizer


def text_config(m: ModelConfig, vocabulary: Vocabulary, max_positions: int) -> dict:
    return {"vocab_size": m.vocab_size, "hidden_size": m.dim, "intermediate_size": m.ffn_dim,
            "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
            "rms_norm_eps": m.norm_eps, "rope_parameters": {"rope_type": "llama3" if m.rope_scaling else "default",
                                                            "rope_theta": m.rope_theta, **m.rope_scaling},
            "max_position_embeddings": max_positions, "tie_word_embeddings": False, "bos_token_id": vocabulary.bos,
            "eos_token_id": vocabulary.eos, "pad_token_id": vocabulary.special("<|pad|>")}


def emu3_extras(tokenizer, vocabulary: Vocabulary, vq_dir: Path, image_size: int):
    """The VQ, the vocabulary map and the processor of an Emu3 export."""
    from transformers import Emu3ImageProcessor, Emu3Processor, Emu3VQVAE

    vq = Emu3VQVAE.from_pretrained(vq_dir).eval()
    vocabulary_map = {**tokenizer.get_vocab(), EMU3_EOL: vocabulary.special("<|eol|>"),
                      EMU3_IMAGE: vocabulary.special(IMAGE_PLACEHOLDER)}
    # the named tokens Emu3Processor reads (tokenizer.image_token, ...); they exist already, so this only
    # names them (passing them to the constructor would add them ahead of Loom's order)
    tokenizer._set_model_specific_special_tokens({
        "image_token": IMAGE_PLACEHOLDER, "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
        "image_wrapper_token": "<|image token|>", "eof_token": "<|eof|>"})
    factor = 2 ** (len(vq.config.channel_multiplier) - 1)
    # Loom scales pixels to [-1, 1]: x / 127.5 - 1
    image_processor = Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, spatial_factor=factor,
                                         min_pixels=image_size * image_size, max_pixels=image_size * image_size)
    return vq, vocabulary_map, Emu3Processor(image_processor=image_processor, tokenizer=tokenizer)


def export_hf(ckpt: str | Path, out: str | Path, fmt: str = "emu3", visual_tokenizer: str | Path | None = None,
              data: str | Path | None = None, log=print) -> dict:
    from transformers import (ChameleonConfig, ChameleonForConditionalGeneration, Emu3Config,
                              Emu3ForConditionalGeneration, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    folder = resolve_checkpoint(ckpt)
    params, cfg, shared = read_checkpoint(folder)
    m = cfg.model
    check_format(m, fmt)
    data_dir, vocab = data_vocabulary(cfg, data)
    vocabulary = Vocabulary.from_dict(vocab["layout"])
    if vocabulary.size != m.vocab_size:
        raise CheckpointError(f"{data_dir}/vocab.json has {vocabulary.size} ids, the checkpoint {m.vocab_size}")
    if fmt == "emu3" and vocabulary.visual_kind == "pixel":
        raise CheckpointError(f"{ckpt}: a pixel-kind model's visual ids are palette colours, not an Emu3VQVAE's codes; "
                              f"export its decoder with --format llama and decode its pixels with the palette")
    if fmt == "emu3" and vocabulary.visual_parts:
        raise CheckpointError(f"{ckpt}: this vocabulary holds several visual tokenizers "
                              f"({', '.join(p.name for p in vocabulary.parts)}) and an Emu3 export one Emu3VQVAE; "
                              f"export its decoder with --format llama and decode each part with its tokenizer")
    tokenizer = build_tokenizer(stored_text_tokenizer(data_dir), vocabulary)
    weights = trim_vocab(to_hf_state_dict(params, m), m.vocab_size)
    kw = text_config(m, vocabulary, cfg.data.seq_len)
    out = Path(out)
    if fmt == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif fmt == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
        weights = {**{k: torch.zeros_like(v) for k, v in model.state_dict().items() if k.endswith("_proj.bias")},
                   **weights}
    elif fmt == "chameleon":
        model = ChameleonForConditionalGeneration(ChameleonConfig(
            **kw, swin_norm=m.swin_norm,
            vocabulary_map={**tokenizer.get_vocab(), EMU3_IMAGE: vocabulary.special(IMAGE_PLACEHOLDER)},
            vq_config={"embed_dim": 8, "num_embeddings": 16, "latent_channels": 8, "base_channels": 32,
                       "channel_multiplier": [1, 2], "resolution": 32, "num_res_blocks": 1}))
    else:
        vq_dir = locate_visual_tokenizer(vocab, data_dir, vocabulary, shared, visual_tokenizer)
        vq, vocabulary_map, processor = emu3_extras(tokenizer, vocabulary, vq_dir, vocab.get("image_size", 32))
        model = Emu3ForConditionalGeneration(Emu3Config(vq_config=vq.config.to_dict(), text_config=kw,
                                                        vocabulary_map=vocabulary_map))
        weights = {("model.text_model." + k[len("model."):] if k.startswith("model.") else k): v
                   for k, v in weights.items()}
        weights.update({f"model.vqmodel.{k}": v for k, v in vq.state_dict().items()})
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (fmt == "chameleon" and k.startswith("model.vqmodel."))]
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit {type(model).__name__}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = vocabulary.bos, vocabulary.eos
    model.generation_config.pad_token_id = vocabulary.special("<|pad|>")
    model.save_pretrained(out)
    (processor if fmt == "emu3" else tokenizer).save_pretrained(out)
    n = sum(t.numel() for t in weights.values())
    log(f"convert to-hf: {folder} (step {shared['step']}) -> {out} as {type(model).__name__}, "
        f"{n / 1e6:.2f}M parameters")
    return {"checkpoint": str(folder), "out": str(out), "format": fmt, "class": type(model).__name__,
            "parameters": n, "step": shared["step"]}


def hf_model_config(config: dict, model_type: str) -> ModelConfig:
    """Loom's model config from a transformers config.json; refuses what Loom's model cannot express."""
    text = config.get("text_config", config) if model_type == "emu3" else config
    rope = text.get("rope_parameters") or {"rope_type": "default", "rope_theta": text.get("rope_theta", 10000.0)}
    problems = [f"{key}={text.get(key)}" for key in ("attention_bias", "mlp_bias", "tie_word_embeddings")
                if text.get(key)]
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        problems.append(f"rope_type={rope['rope_type']}")
    if text.get("use_sliding_window"):
        problems.append("use_sliding_window=True")
    if text.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={text['hidden_act']}")
    n_heads = text["num_attention_heads"]
    if text.get("head_dim") not in (None, text["hidden_size"] // n_heads):
        problems.append(f"head_dim={text['head_dim']}")
    if problems:
        raise CheckpointError(f"this {model_type} model uses {', '.join(problems)}, which Loom's model does not have")
    chameleon = model_type == "chameleon"
    return ModelConfig(preset="chameleon" if chameleon else "emu3", dim=text["hidden_size"],
                       n_layers=text["num_hidden_layers"], n_heads=n_heads,
                       n_kv_heads=text.get("num_key_value_heads") or n_heads, ffn_dim=text["intermediate_size"],
                       norm_eps=text["rms_norm_eps"], rope_theta=float(rope["rope_theta"]),
                       rope_scaling={k: float(rope[k]) for k in LLAMA3_ROPE_KEYS} if rope.get("rope_type") == "llama3"
                       else {},
                       vocab_size=text["vocab_size"],
                       qk_norm=chameleon, swin_norm=bool(text.get("swin_norm")) if chameleon else False,
                       qkv_bias=model_type == "qwen2")


def check_text_vocabulary(hf_dir: Path, data_dir: Path, text_size: int) -> str:
    """Refuses token data made with another tokenizer than the model's own (when both are transformers
    tokenizers: their ids below `text_size` must name the same tokens); says what was checked."""
    from transformers import AutoTokenizer

    stored = stored_text_tokenizer(data_dir)
    if not (hf_dir / "tokenizer.json").exists() or not stored.is_dir():
        return f"not checked: {hf_dir} or {data_dir} has no transformers tokenizer to compare"
    theirs = AutoTokenizer.from_pretrained(hf_dir).get_vocab()
    ours = {t: i for t, i in AutoTokenizer.from_pretrained(stored).get_vocab().items() if i < text_size}
    differ = sorted((i, t) for t, i in ours.items() if theirs.get(t) != i)
    if differ:
        raise CheckpointError(f"{data_dir} was tokenized with another tokenizer than {hf_dir}'s: {len(differ)} of its "
                              f"{text_size} text ids differ (e.g. {differ[:3]}); tokenize with text_tokenizer="
                              f"{hf_dir}")
    return f"the data's {text_size} text ids are the model tokenizer's"


def import_hf(hf_dir: str | Path, out: str | Path, data: str | Path | None = None, noise: float = 0.01,
              seed: int = 0, log=print) -> dict:
    """A Hugging Face Llama (3.x rope scaling included), Qwen2, Emu3 or Chameleon directory -> a Loom run directory
    whose checkpoint `loom train OUT/config.yaml` continues from (any layout; fresh optimizer). An Emu3 directory's
    VQ is saved as OUT/visual_tokenizer, usable by `loom data tokenize`.

    With `data` (a token directory tokenized with the model's own tokenizer): the embedding and output grow to the
    data's vocabulary (hf.grow_vocab: rows past the tokenizer's ids are new, mean plus `noise`), the config records
    the first new row (model.new_rows_from, for optimizer.freeze_steps) and trains on `data`."""
    from transformers import (ChameleonForConditionalGeneration, Emu3ForConditionalGeneration, LlamaForCausalLM,
                              Qwen2ForCausalLM)

    hf_dir, out = Path(hf_dir), Path(out)
    config_file = hf_dir / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{config_file} not found: not a Hugging Face model directory")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    classes = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "emu3": Emu3ForConditionalGeneration,
               "chameleon": ChameleonForConditionalGeneration}
    if model_type not in classes:
        raise CheckpointError(f"{config_file}: model_type {model_type!r} is not one of {', '.join(classes)}")
    m = hf_model_config(config, model_type)
    grown = ""
    if data is not None:
        data_dir = Path(data)
        if not (data_dir / "vocab.json").exists():
            raise CheckpointError(f"{data_dir}/vocab.json not found: --data takes a directory written by "
                                  f"`loom data tokenize`")
        vocabulary = Vocabulary.from_dict(json.loads((data_dir / "vocab.json").read_text())["layout"])
        if vocabulary.text_size > m.vocab_size:
            raise CheckpointError(f"{data_dir} has {vocabulary.text_size} text ids but the model only "
                                  f"{m.vocab_size} rows: tokenize with the model's own tokenizer (text_tokenizer="
                                  f"{hf_dir})")
        checked = check_text_vocabulary(hf_dir, data_dir, vocabulary.text_size)
    hf = classes[model_type].from_pretrained(hf_dir, dtype=torch.float32)
    state = hf.state_dict()
    if model_type == "emu3":
        state = {("model." + k[len("model.text_model."):] if k.startswith("model.text_model.") else k): v
                 for k, v in state.items()}
        hf.model.vqmodel.save_pretrained(out / "visual_tokenizer")
    params = from_hf_state_dict(state, m)
    cfg = TrainConfig(model=m, out_dir=str(out))
    if data is not None:
        params = grow_vocab(params, vocabulary.text_size, vocabulary.size, noise, seed)
        grown = (f"; vocabulary {m.vocab_size} -> {vocabulary.size} rows, new from id {vocabulary.text_size} (mean + "
                 f"{noise} x std noise; {checked})")
        m.vocab_size, m.new_rows_from = vocabulary.size, vocabulary.text_size
        cfg.data.sources = {data_dir.name: SourceConfig(path=str(data_dir.resolve()))}
    params = pad_vocab(params, m.padded_vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    folder = write_portable_checkpoint(out, params, cfg)
    dump_yaml(cfg, out / "config.yaml")
    n = sum(t.numel() for t in params.values())
    then = "" if data is not None else " data.sources.NAME.path=TOKENS"
    log(f"convert from-hf: {hf_dir} ({model_type}, {n / 1e6:.2f}M parameters) -> {folder}{grown}; continue with "
        f"`loom train {out / 'config.yaml'}{then}`")
    return {"out": str(out), "checkpoint": str(folder), "model_type": model_type, "parameters": n,
            "new_rows_from": m.new_rows_from, "vocab_size": m.vocab_size}
