"""Start from an existing LLM (issue 21): a transformers tokenizer as the text part of the vocabulary, an imported
Llama 3.x / Qwen2 model grown to the data's vocabulary, trained on 2 processes with optimizer.freeze_steps, and
exported back. Everything is made here: a tiny byte-level BPE tokenizer trained with `tokenizers` on the shapes
world's text (Llama 3's layout: its BOS/EOS after the merges; Qwen2's: an EOS and no BOS) and tiny random models
of the size test_import_hf uses."""

import json

import pytest
import torch

from conftest import REPO, run_loom
from test_convert import export, loom_logits
from test_import_hf import LLAMA3_ROPE, TEXT

TOL = 1e-4  # fp32 logits of the same weights through two implementations, as test_import_hf


def bpe_tokenizer(world, out, style, vocab_size=290):
    """A byte-level BPE tokenizer of about `vocab_size` ids with Llama 3's or Qwen2's special tokens, saved for
    AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data_pipeline.raw import SkipCounter
    from data_pipeline.sources import iter_documents

    texts = [s.text for _, segments in iter_documents([world / "raw"], SkipCounter()) for s in segments
             if s.kind == "text"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if style == "llama3":
        tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                       eos_token="<|end_of_text|>")
    else:
        tok.add_special_tokens(["<|endoftext|>"])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def test_the_fingerprint_covers_every_file_of_a_transformers_tokenizer(world, tmp_path):
    from common.config import ConfigError
    from data_pipeline.tokenize_config import load_tokenize_config
    from data_pipeline.vocab import Vocabulary, fingerprint

    bpe_tokenizer(world, tmp_path / "tok", "llama3")
    layout = Vocabulary.for_text(292, 256, 290, 291)
    base = fingerprint(layout, tmp_path / "tok", world / "tok" / "vq")
    assert fingerprint(Vocabulary.for_text(292, 256, None, 291), tmp_path / "tok", world / "tok" / "vq") != base
    config = tmp_path / "tok" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("<|end_of_text|>", "<|begin_of_text|>", 1))
    assert fingerprint(layout, tmp_path / "tok", world / "tok" / "vq") != base
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="text_tokenizer: neither a sentencepiece file nor a directory with "
                                          "tokenizer.json"):
        load_tokenize_config(None, [f"text_tokenizer={tmp_path / 'empty'}", f"visual_tokenizer={world / 'tok' / 'vq'}",
                                    "sources=[{name: a, format: text, paths: [x.txt]}]"])


def hf_model(style, vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    text = {**TEXT, "vocab_size": vocab_size}
    model = (LlamaForCausalLM(LlamaConfig(**text, rope_parameters=LLAMA3_ROPE)) if style == "llama3"
             else Qwen2ForCausalLM(Qwen2Config(**text)))
    with torch.no_grad():  # a realistic spread, norms and biases included
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.05) + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_an_llm_grows_trains_and_exports(style, world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_pipeline.text_tokenizer import load_text_tokenizer
    from data_pipeline.tokenize_job import tokenize
    from data_pipeline.vocab import SPECIAL_TOKENS, Vocabulary

    tokenizer = bpe_tokenizer(world, tmp_path / "hf", style)
    text_size = len(tokenizer)
    # Qwen2 pads its embedding past the tokenizer (151936 rows for 151665 ids): those rows are replaced too
    hf = hf_model(style, text_size + (0 if style == "llama3" else 13))
    hf.save_pretrained(tmp_path / "hf")

    # the vocabulary keeps the tokenizer's ids and reuses its BOS/EOS; the shards hold its encoding of the text
    tokenize([world / "raw"], tmp_path / "tokens", tmp_path / "hf", world / "tok" / "vq", 32, 8, log=lambda m: None)
    vocab = json.loads((tmp_path / "tokens" / "vocab.json").read_text())
    layout = Vocabulary.from_dict(vocab["layout"])
    assert layout.text_size == text_size and layout.eos == tokenizer.eos_token_id
    assert layout.bos == (tokenizer.bos_token_id if style == "llama3" else text_size)
    assert len(layout.special_tokens) == len(SPECIAL_TOKENS) - (2 if style == "llama3" else 1)
    text = load_text_tokenizer(tmp_path / "tokens" / "text_tokenizer")
    assert text.encode("a red circle\n  at 3*4") == tokenizer.encode("a red circle\n  at 3*4", add_special_tokens=False)

    if style == "llama3":  # data of another tokenizer (other merges, so other ids) is refused, nothing written
        import shutil

        shutil.copytree(tmp_path / "hf", tmp_path / "hf_other")
        bpe_tokenizer(world, tmp_path / "hf_other", style, vocab_size=280)
        result = run_loom("convert", "from-hf", tmp_path / "hf_other", tmp_path / "other", "--data",
                          tmp_path / "tokens")
        assert result.returncode != 0 and "was tokenized with another tokenizer" in result.stderr
        assert not (tmp_path / "other").exists()
    result = run_loom("convert", "from-hf", tmp_path / "hf", tmp_path / "run", "--data", tmp_path / "tokens")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "text ids are the model tokenizer's" in result.stdout
    ids = torch.tensor(tokenizer.encode("a blue square on a green ground", add_special_tokens=False) * 3)
    with torch.no_grad():
        original = hf(input_ids=ids[None]).logits
    grown = loom_logits(tmp_path / "run", ids)
    assert grown.shape[-1] == layout.size
    assert (grown[..., :text_size] - original[..., :text_size]).abs().max() <= TOL  # the old ids' logits

    # 2 processes (TP2), 5 steps, the first 2 training only the new rows and the norms
    result = run_loom("train", tmp_path / "run" / "config.yaml", "parallel.nproc_per_node=2", "parallel.tp=2",
                      "schedule.steps=5", "schedule.warmup_steps=1", "checkpoint.interval=2", "checkpoint.keep_last=5",
                      "data.seq_len=64", "data.global_batch_size=4", "data.micro_batch_size=2", "logging.interval=1",
                      "optimizer.lr=1e-3", "optimizer.freeze_steps=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "steps 1-2 train only the new rows" in result.stdout
    assert_frozen_then_trained(*(load_portable(tmp_path / "run", s) for s in (0, 2, 5)), text_size, layout.size)

    # exported with the tokenizer: transformers encodes text to the ids Loom trained on, and gives Loom's logits
    export(tmp_path / "run", tmp_path / "out", "llama" if style == "llama3" else "qwen2")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "out")
    sample = "a red circle\n  at 3*4"
    assert theirs.encode(sample, add_special_tokens=False) == text.encode(sample)
    assert theirs.convert_tokens_to_ids(["<|image start|>", "<|visual token 000255|>"]) == [
        layout.special("<|image start|>"), layout.size - 1]
    assert (theirs.bos_token_id, theirs.eos_token_id) == (layout.bos, layout.eos)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.tensor([layout.bos, *text.encode(sample), layout.special("<|image start|>"), layout.size - 1])
    with torch.no_grad():
        assert (exported(input_ids=ids[None]).logits - loom_logits(tmp_path / "run", ids)).abs().max() <= TOL
    if style == "llama3":  # the whole Emu3 model (LM, visual tokenizer, processor) over the LLM's tokenizer
        from transformers import AutoProcessor, Emu3ForConditionalGeneration

        emu3 = export(tmp_path / "run", tmp_path / "emu3", "emu3")
        processor = AutoProcessor.from_pretrained(emu3)
        assert processor.tokenizer.encode(sample, add_special_tokens=False) == text.encode(sample)
        assert (processor.tokenizer.bos_token_id, processor.tokenizer.eos_token_id) == (layout.bos, layout.eos)
        assert processor.tokenizer.convert_tokens_to_ids("<|image start|>") == layout.special("<|image start|>")
        side = 32  # the world's images: a 4x4 code grid
        prompt = processor(text=["A red circle."], return_for_image_generation=True, ratio="1:1",
                           image_area=side * side)["input_ids"][0]
        from analysis.generate import Generator

        assert prompt == Generator.from_checkpoint(tmp_path / "run").visual_prompt("A red circle.", "<|image start|>",
                                                                                     (4, 4))
        model = Emu3ForConditionalGeneration.from_pretrained(emu3, dtype=torch.float32).eval()
        with torch.no_grad():
            assert (model(input_ids=ids[None]).logits - loom_logits(tmp_path / "run", ids)).abs().max() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.zero_stage=3"], ["parallel.pp=2"]], ids=["dp2-zero3", "pp2"])
def test_freeze_steps_hold_under_zero3_and_the_pipeline(layout, world, tmp_path):
    """optimizer.freeze_steps where the weights are ZeRO-3 partitions or pipeline stages: through steps 1-2 only the
    rows from new_rows_from (here Loom's specials and the codes) and the norms move, bit for bit; at step 3 all."""
    from data_pipeline.shards import read_json
    from data_pipeline.vocab import Vocabulary

    vocab = Vocabulary.from_dict(read_json(world / "tokens" / "manifest.json")["layout"])
    run = tmp_path / "run"
    result = run_loom("train", REPO / "configs" / "tiny.yaml", f"out_dir={run}",
                      f"data.sources.shapes.path={world / 'tokens'}", "parallel.nproc_per_node=2", *layout,
                      f"model.new_rows_from={vocab.text_size}", "optimizer.freeze_steps=2", "schedule.steps=3",
                      "schedule.warmup_steps=1", "checkpoint.interval=1", "checkpoint.keep_last=3",
                      "data.micro_batch_size=2", "logging.interval=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_frozen_then_trained(*(load_portable(run, s) for s in (1, 2, 3)), vocab.text_size, vocab.size)


def assert_frozen_then_trained(before, frozen, after, new_rows_from, vocab_size):
    """Weights `before` and at the last frozen step: only the rows from new_rows_from and the norms moved; `after`
    the frozen steps everything moved."""
    for name, start in before.items():
        moved = (frozen[name] != start).any(-1) if start.ndim == 2 else (frozen[name] != start).any()
        if "norm" in name:
            assert moved.all(), name
        elif name == "head.output.weight":  # every output row has a gradient (the softmax)
            assert not moved[:new_rows_from].any() and moved[new_rows_from:vocab_size].all(), name
        elif name == "embed.embed.weight":  # the rows of the ids in the batches
            assert not moved[:new_rows_from].any() and moved[new_rows_from:vocab_size].any(), name
        else:
            assert not moved.any(), name  # frozen bit for bit (no weight decay while frozen)
        assert (after[name] != frozen[name]).any(), name  # then everything trains


def load_portable(run, step):
    """The full fp32 weights of a run's checkpoint at `step`, whatever its layout."""
    from checkpoints_utils.reader import read_checkpoint
    from common.checkpoint_folders import checkpoint_root, tag_for

    params, _, _ = read_checkpoint(checkpoint_root(run) / tag_for(step))
    return params
