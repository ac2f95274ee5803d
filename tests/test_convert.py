"""Export to and import from Hugging Face transformers, checked against Loom's own logits.

The checkpoints come from TP2xPP2 runs (4 processes), so export exercises the consolidation of
tensor-parallel shards and pipeline stages. Parity: the exported model's logits equal Loom's
within 1e-4 (fp32) on a real document with text and image tokens.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import SOURCE_LAYOUTS, run_loom, train_tiny

TOL = 1e-4


@pytest.fixture(scope="module")
def chameleon(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("chameleon") / "run"
    train_tiny(world, out, 4, "model.preset=chameleon", *SOURCE_LAYOUTS["tp2-pp2-zero1"])
    return out


def document_ids(world, vocab_size):
    """The first packed document that has text and image codes: (ids of length s,)."""
    from data_pipeline.loader import Source, TokenLoader, read_manifest_fingerprints

    src = Source.open("shapes", world / "tokens", 1.0)
    vocabulary = read_manifest_fingerprints([src])[1]
    for mb in TokenLoader([src], vocabulary, seq_len=128, global_batch_size=4, micro_batch_size=4).next_step():
        for row, docs in zip(mb["tokens"], mb["doc_ids"]):
            for d in docs.unique():
                ids = row[docs == d]
                if (ids >= vocabulary.visual_offset).sum() > 8 and (ids < vocabulary.text_size).sum() > 8:
                    assert int(ids.max()) < vocab_size
                    return ids
    raise AssertionError("no document with text and image tokens")


def loom_logits(ckpt, ids):
    from analysis.nll import load_model

    model, cfg, _ = load_model(ckpt)
    with torch.no_grad():
        logits = model(ids[None], torch.arange(len(ids))[None], torch.zeros(1, len(ids), dtype=torch.long))
    return logits.transpose(0, 1)[..., :cfg.model.vocab_size]


def export(ckpt, out, fmt, visual_tokenizer=None, data=None):
    """In this process (the `loom convert` command itself is exercised by the refusals and the import)."""
    from checkpoints_utils.convert import export_hf

    export_hf(ckpt, out, fmt, visual_tokenizer, data, log=lambda m: None)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["emu3", "llama"])
def test_export_matches_loom_logits(fmt, sources, world, tmp_path, groups):
    import transformers

    ckpt = sources / "tp2-pp2-zero1"
    out = export(ckpt, tmp_path / fmt, fmt)
    cls = transformers.Emu3ForConditionalGeneration if fmt == "emu3" else transformers.LlamaForCausalLM
    hf = cls.from_pretrained(out).eval()
    ids = document_ids(world, hf.config.get_text_config().vocab_size)
    with torch.no_grad():
        theirs = hf(input_ids=ids[None]).logits
    assert (theirs - loom_logits(ckpt, ids)).abs().max() <= TOL
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    from data_pipeline.text_tokenizer import TextTokenizer

    text = TextTokenizer(world / "tokens" / "text_tokenizer.model")
    for caption in ("two red squares on the left of a blue circle 12*34", " spaces  kept,\nlines too ",
                    "def f(x):\n    if x:\n\n\t\treturn x  \r\n"):
        assert tokenizer.encode(caption, add_special_tokens=False) == text.encode(caption)


@pytest.mark.slow
def test_chameleon_export_matches_and_wrong_formats_are_refused(chameleon, sources, world, tmp_path, groups):
    from transformers import ChameleonForConditionalGeneration

    out = export(chameleon, tmp_path / "cham", "chameleon")
    hf = ChameleonForConditionalGeneration.from_pretrained(out).eval()
    assert hf.config.swin_norm
    ids = document_ids(world, hf.config.vocab_size)
    with torch.no_grad():
        theirs = hf(input_ids=ids[None]).logits
    assert (theirs - loom_logits(chameleon, ids)).abs().max() <= TOL
    refused = run_loom("convert", "to-hf", chameleon, tmp_path / "x", "--format", "llama")
    assert refused.returncode != 0 and "qk-norm/swin-norm (the chameleon preset)" in refused.stderr
    refused = run_loom("convert", "to-hf", sources / "tp2-pp2-zero1", tmp_path / "y", "--format", "chameleon")
    assert refused.returncode != 0 and "always applies a per-head qk LayerNorm" in refused.stderr


@pytest.mark.slow
def test_transformers_generates_the_image_loom_generates(sources, world, tmp_path):
    """Greedy text-to-image of the same prompts, without and with classifier-free guidance: transformers'
    `generate` on the Emu3 export (its processor's prompt, the grid forced as transformers' example does,
    `decode_image_tokens`) draws the image `loom generate` draws from the checkpoint, code for code; pixels
    differ only by the rounding of two decoders' floats."""
    import numpy as np

    from analysis.generate import Generator, Sampling
    from analysis.transformers_images import TransformersImages

    out = export(sources / "tp2-dp2-zero3", tmp_path / "emu3", "emu3")
    theirs, ours = TransformersImages(out), Generator.from_checkpoint(sources / "tp2-dp2-zero3", data=world / "tokens")
    prompts = ["A red square.", "A blue circle on the left.", "Two green triangles."]
    for guidance in (1.0, 3.0):
        sampling = Sampling(temperature=0, cfg_scale=guidance)
        for prompt, a, b in zip(prompts, theirs.images(prompts, sampling), ours.images(prompts, sampling)):
            assert a.shape == b.shape == (32, 32, 3)
            gap = np.abs(a.astype(int) - b.astype(int))
            assert gap.max() <= 2, (prompt, guidance, gap.max())  # another code would change a whole 8x8 patch
        assert len({image.tobytes() for image in ours.images(prompts, sampling)}) > 1  # the prompts matter


def loom_documents(world) -> dict:
    """One raw document of each kind of the test world, with the ids the tokenize job writes for it."""
    from data_pipeline.raw import SkipCounter
    from data_pipeline.sources import iter_documents
    from data_pipeline.text_tokenizer import TextTokenizer
    from data_pipeline.tokenize import DocumentEncoder
    from data_pipeline.visual_tokenizer import VisualTokenizer
    from data_pipeline.vocab import Vocabulary

    vocabulary = Vocabulary.from_dict(json.loads((world / "tokens" / "vocab.json").read_text())["layout"])
    encoder = DocumentEncoder(TextTokenizer(world / "tok" / "text_tokenizer.model"),
                              VisualTokenizer.from_pretrained(world / "tok" / "vq"), vocabulary, 32, 8)
    kinds = {"caption, image": ["text", "image"], "video": ["text", "video"], "text": ["text"]}
    found = {}
    for _, segments in iter_documents([world / "raw"], SkipCounter()):
        order = [s.kind for s in segments]
        name = next((k for k, v in kinds.items() if v == order),
                    "interleaved" if "image" in order and order.count("text") >= 2 else None)
        if name and name not in found:
            found[name] = encoder.decode(segments)
    assert set(found) == {*kinds, "interleaved"}, sorted(found)
    found["image, caption"] = found["caption, image"][::-1]  # as img2dataset sources write some (captioning)
    return {name: (decoded, encoder.encode_batch([decoded])[0][0].tolist()) for name, decoded in found.items()}


@pytest.mark.slow
def test_transformers_processor_builds_the_ids_loom_trains_on(sources, world, tmp_path):
    """Each kind of document through Emu3Processor (images merged in as the model does) equals Loom's shard
    ids; the processor's image-generation prompt equals `loom generate`'s."""
    from PIL import Image
    from transformers import Emu3ForConditionalGeneration, Emu3Processor

    from analysis.generate import Generator

    out = export(sources / "tp2-dp2-zero3", tmp_path / "emu3", "emu3")
    model = Emu3ForConditionalGeneration.from_pretrained(out).eval()
    processor = Emu3Processor.from_pretrained(out)
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    for name, (decoded, loom_ids) in loom_documents(world).items():
        if name == "video":  # Emu3Processor has no video path: its prefix through the tokenizer
            (_, caption), (_, frames) = decoded
            t, h, w = len(frames) // 4, 32 // 8, 32 // 8  # the VQ's 4x temporal and 8x spatial downsampling
            prefix = f"{tok.bos_token}{caption}<|video start|>{t}*{h}*{w}<|image token|>"
            ids = tok(prefix, add_special_tokens=False)["input_ids"]
            assert ids == loom_ids[:len(ids)], (tok.convert_ids_to_tokens(ids), tok.convert_ids_to_tokens(loom_ids))
            continue
        text = "".join(payload if kind == "text" else processor.image_token for kind, payload in decoded)
        images = [Image.fromarray(payload) for kind, payload in decoded if kind == "image"]
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        ids = inputs["input_ids"][0]
        if images:
            with torch.no_grad():
                codes = model.model.get_image_tokens(inputs["pixel_values"], inputs["image_sizes"])
            ids = ids.masked_scatter(ids == tok.convert_tokens_to_ids(processor.image_token), codes.to(ids.dtype))
        assert ids.tolist() + [eos] == loom_ids, (name, tok.convert_ids_to_tokens(ids),
                                                  tok.convert_ids_to_tokens(loom_ids))

    generator = Generator.from_checkpoint(sources / "tp2-dp2-zero3", data=world / "tokens")
    prompt = "A red circle on the left."
    theirs = processor(text=[prompt], return_for_image_generation=True, ratio="1:1", image_area=32 * 32)
    h, w = theirs["image_sizes"][0]
    assert list(theirs["input_ids"][0]) == generator.visual_prompt(prompt, "<|image start|>", (h, w))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["emu3", "llama", "chameleon"])
def test_import_then_export_is_exact_and_trains(fmt, chameleon, sources, world, tmp_path):
    ckpt = chameleon if fmt == "chameleon" else sources / "tp2-pp2-zero1"
    original = export(ckpt, tmp_path / "original", fmt)
    imported = tmp_path / "imported"
    result = run_loom("convert", "from-hf", original, imported)
    assert result.returncode == 0, result.stderr[-2000:]
    again = export(imported, tmp_path / "again", fmt, imported / "visual_tokenizer" if fmt == "emu3" else None,
                   world / "tokens")
    a, b = load_file(original / "model.safetensors"), load_file(again / "model.safetensors")
    language_model = [k for k in a if "vqmodel" not in k or fmt == "emu3"]  # Chameleon's VQ is not Loom's
    assert language_model and set(language_model) <= set(b)
    assert all(torch.equal(a[k], b[k]) for k in language_model)
    if fmt != "llama":
        return
    nll = [json.loads(run_loom("eval", "nll", c, "--data", world / "heldout_tokens", "--max-tokens", "1024",
                               "--seq-len", "128").stdout)
           for c in (ckpt, imported)]
    assert abs(nll[0]["loss"]["total"] - nll[1]["loss"]["total"]) <= 1e-5
    assert nll[0]["loss_tokens"] == nll[1]["loss_tokens"]
    assert nll[0]["bits_per_token"]["image"] == pytest.approx(nll[0]["loss"]["image"] / math.log(2))
    trained = run_loom("train", imported / "config.yaml", f"out_dir={imported}",
                       f"data.sources.shapes.path={world / 'tokens'}",
                       "parallel.tp=2", "parallel.nproc_per_node=2", "schedule.steps=2", "schedule.warmup_steps=1",
                       "data.global_batch_size=8", "data.micro_batch_size=4", "data.seq_len=128")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "imported weights" in trained.stdout and "trained 2 steps" in trained.stdout
