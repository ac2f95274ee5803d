"""A vocabulary built to hold two visual kinds (data_pipeline/vocab.py `Vocabulary.with_parts`): VQ codes and palette
colours in two id ranges, a visual tokenizer per source, one fingerprint; shards of separately built vocabularies
are still refused together; next-scale rewriting touches only the scale part's frames; a model trains on both
kinds and generates each through the CLI."""

import json

import numpy as np
import pytest
import yaml

from common.config import ConfigError
from conftest import REPO, run_loom
from data_pipeline.loader import Source, read_manifest_fingerprints
from data_pipeline.next_scale import NextScaleLayout
from data_pipeline.palette import PaletteTokenizer, image_pixels, train_palette
from data_pipeline.shards import read_json
from data_pipeline.text_tokenizer import TextTokenizer
from data_pipeline.tokenize_config import load_tokenize_config
from data_pipeline.tokenize_job import run_tokenize
from data_pipeline.vocab import IMAGE, IMAGE_MAP, SCALE_MARKER, TEXT, VISUAL_STRUCTURE, Vocabulary, fingerprint

PARTS = [("main", "token", 256, ()), ("palette", "pixel", 64, ())]


def test_parts_follow_each_other_and_one_part_is_the_plain_layout():
    L = Vocabulary.with_parts(400, PARTS)
    main, palette = L.parts
    assert (main.offset, main.end, palette.offset, palette.end) == (L.visual_offset, L.visual_offset + 256,
                                                                     L.visual_offset + 256, L.size)
    assert L.visual_kind == "mixed" and L.codebook_size == 320 and L.kinds == {"token", "pixel"}
    assert Vocabulary.from_dict(json.loads(json.dumps(L.to_dict()))) == L
    single = Vocabulary.with_parts(400, PARTS[:1])
    assert single == Vocabulary.for_text(400, 256) and "visual_parts" not in single.to_dict()
    with_scale = Vocabulary.with_parts(400, [PARTS[0], ("scale", "scale", 64, (1, 2))])
    assert with_scale.special(SCALE_MARKER) == with_scale.special_tokens.index(SCALE_MARKER) + 400
    assert with_scale.scale_maps == (1, 2) and with_scale.part("scale").scale_maps == (1, 2)
    with pytest.raises(ValueError, match="the first is 'main'"):
        Vocabulary.with_parts(400, PARTS[::-1])
    with pytest.raises(ValueError, match="at most one"):
        Vocabulary.with_parts(400, [PARTS[0], ("a", "scale", 8, (1,)), ("b", "scale", 8, (1,))])
    with pytest.raises(ValueError, match="no visual part 'video'; it has main, palette"):
        L.part("video")


def test_next_scale_rewriting_leaves_the_other_parts_frames_as_they_are():
    """A document with a token-kind image (rows and eol) and a scale-kind image: the first is read as stored, the
    second gets the training form it has in a vocabulary of the scale kind alone."""
    L = Vocabulary.with_parts(100, [("main", "token", 32, ()), ("scale", "scale", 16, (1, 2))])
    alone = Vocabulary.for_text(100, 16, visual_kind="scale", scale_maps=(1, 2))
    main, scale = L.parts
    start, token, end, eol, eof = (L.special(t) for t in ("<|image start|>", "<|image token|>", "<|image end|>",
                                                          "<|eol|>", "<|eof|>"))
    M = L.special(SCALE_MARKER)
    grid = [start, 7, token, main.offset + 3, main.offset + 4, eol, eof, end]
    grid_kinds = [VISUAL_STRUCTURE] * 3 + [IMAGE] * 2 + [VISUAL_STRUCTURE] * 3
    maps = [start, 7, token, M, scale.offset + 9, M, *(scale.offset + c for c in (1, 2, 3, 4)), eof, end]
    map_kinds = [VISUAL_STRUCTURE] * 4 + [IMAGE] + [VISUAL_STRUCTURE] + [IMAGE] * 4 + [VISUAL_STRUCTURE] * 2
    tokens = np.array([L.bos, 5, *grid, 6, *maps, L.eos])
    kinds = np.array([TEXT] * 2 + grid_kinds + [TEXT] + map_kinds + [TEXT], dtype=np.int8)
    out, out_kinds, inputs, reach = NextScaleLayout(L).rewrite(tokens, kinds)
    head = 2 + len(grid) + 1
    assert np.array_equal(out[:head], tokens[:head]) and np.array_equal(inputs[:head], tokens[:head])
    assert not reach[:head].any() and np.array_equal(out_kinds[:head], kinds[:head])
    # the scale image, ids moved into the single-kind vocabulary, rewrites exactly as it does there
    shift = np.where((tokens >= scale.offset) & (tokens < scale.end), alone.visual_offset - scale.offset, 0)
    ref = NextScaleLayout(alone).rewrite(tokens[head:] + shift[head:], kinds[head:])

    def back(ids):
        return np.where(ids >= alone.visual_offset, ids - alone.visual_offset + scale.offset, ids)

    assert np.array_equal(out[head:], back(ref[0])) and np.array_equal(inputs[head:], back(ref[2]))
    assert np.array_equal(out_kinds[head:], ref[1]) and np.array_equal(reach[head:], ref[3])
    assert (out_kinds == IMAGE_MAP + 1).sum() == 4


def two_kinds_config(world, tmp_path, palette, raw="raw", image_size=16, **source_overrides):
    cfg = {"out_dir": str(tmp_path / "tokens"), "text_tokenizer": str(world / "tok" / "text_tokenizer.model"),
           "visual_tokenizer": str(world / "tok" / "vq"), "geometry": {"size": 32}, "video_frames": 8,
           "more_visual_tokenizers": [{"name": "palette", "path": str(palette), "image_size": image_size}],
           "sources": [{"name": "codes", "format": "loom", "paths": [str(world / raw)]},
                       {"name": "pixels", "format": "loom", "paths": [str(world / raw)], "visual": "palette",
                        **source_overrides}]}
    path = tmp_path / "two_kinds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def two_kinds(world, tmp_path_factory):
    """The world tokenized twice into one vocabulary: VQ codes (source codes) and 16x16 palette pixels (pixels),
    with its held-out half the same way."""
    root = tmp_path_factory.mktemp("two_kinds")
    pixels, _, _ = image_pixels([world / "raw"], 16, 100)
    PaletteTokenizer(train_palette(pixels, 64)[0]).save_pretrained(root / "palette")
    for raw, out in (("raw", "train"), ("heldout_raw", "heldout")):
        (root / out).mkdir()
        run_tokenize(load_tokenize_config(two_kinds_config(world, root / out, root / "palette", raw)),
                     log=lambda *a: None)
    return root


def test_one_tokenize_job_writes_two_kinds_into_one_vocabulary(two_kinds, world):
    from conftest import assert_image_grid, spans_of

    tokens = two_kinds / "train" / "tokens"
    manifest = read_json(tokens / "manifest.json")
    L = Vocabulary.from_dict(manifest["layout"])
    assert [(p.name, p.kind, p.size) for p in L.parts] == [("main", "token", 256), ("palette", "pixel", 64)]
    text_model = world / "tok" / "text_tokenizer.model"
    assert manifest["fingerprint"] == fingerprint(L, text_model, [world / "tok" / "vq", two_kinds / "palette"])
    text = TextTokenizer(text_model)
    for name, part, side in (("codes", "main", 4), ("pixels", "palette", 16)):
        vocab = read_json(tokens / name / "vocab.json")
        assert vocab.get("visual", "main") == part and vocab["image_size"] == side * (8 if part == "main" else 1)
        assert vocab["visual_tokenizer"] == str((world / "tok" / "vq" if part == "main" else two_kinds / "palette"))
        images = [span for kind, span in spans_of(tokens / name, read_json(tokens / name / "manifest.json"))
                  if kind == "image"]
        assert images
        for span in images:
            assert_image_grid(span, L, text, side, side)
            codes = np.array(span)[L.is_visual(np.array(span))]
            assert L.part(part).holds(codes).all()
    # both sources train together: one fingerprint; the token kind tokenized alone is another vocabulary
    sources = [Source.open(n, tokens / n, 1.0) for n in ("codes", "pixels")]
    assert read_manifest_fingerprints(sources)[1] == L
    with pytest.raises(ValueError, match="different vocabularies"):
        read_manifest_fingerprints(sources + [Source.open("alone", world / "tokens", 1.0)])


def test_a_source_naming_an_unknown_visual_tokenizer_or_size_is_refused(world, tmp_path):
    (tmp_path / "palette").mkdir()
    with pytest.raises(ConfigError, match=r"sources\[1\] \(pixels\).visual='colours': use one of main, palette"):
        load_tokenize_config(two_kinds_config(world, tmp_path, tmp_path / "palette", visual="colours"))
    # a second VQ (downsampling 8) asked for 36-pixel images: refused before any shard is written
    cfg = load_tokenize_config(two_kinds_config(world, tmp_path, world / "tok" / "vq", image_size=36))
    with pytest.raises(ConfigError, match=r"more_visual_tokenizers \(palette\).image_size: geometry size 36 must be a "
                                          r"multiple of 8"):
        run_tokenize(cfg, log=lambda *a: None)
    assert not list((tmp_path / "tokens").glob("*/tokens-*.tar"))


def test_a_sweep_over_kinds_sizes_each_kinds_model_by_its_own_vocabulary(two_kinds, world, tmp_path):
    """Each mixture of a sweep may train on another vocabulary (configs/sweeps/cpu_kinds.yaml: one per kind): its
    points' parameter counts follow that mixture's data."""
    from analysis.sweep import load_sweep

    spec = tmp_path / "kinds.yaml"
    spec.write_text(yaml.safe_dump({
        "base": str(REPO / "configs" / "tiny.yaml"), "overrides": [f"data.sources.shapes.path={world / 'tokens'}"],
        "mixtures": {"token": {"image_share": 1.0, "overrides": [f"data.sources.shapes.path={world / 'tokens'}"]},
                     "both": {"image_share": 1.0,
                              "overrides": [f"data.sources.shapes.path={two_kinds / 'train' / 'tokens' / 'codes'}"]}},
        "size": {"depths": [1, 2, 3], "aspect": 32, "head_dim": 16}, "tokens": [1e5], "min_steps": 4}))
    points = {(p.mixture, p.depth): p.params["total"] for p in load_sweep(spec)[4]}
    dim = 32  # depth 1: two embedding tables of dim rows per id, and 64 more ids (the palette's part)
    assert points[("both", 1)] - points[("token", 1)] == 2 * dim * 64


def test_the_kinds_sweep_data_recipe_loads_for_both_of_its_kinds(tmp_path):
    """configs/tokenize/kinds_world.yaml as its header runs it: the scale kind, then the pixel kind by overrides."""
    recipe = REPO / "configs" / "tokenize" / "kinds_world.yaml"
    (tmp_path / "t.model").write_bytes(b"")
    base = [f"text_tokenizer={tmp_path / 't.model'}", f"visual_tokenizer={tmp_path}"]
    scale = load_tokenize_config(recipe, base)
    pixel = load_tokenize_config(recipe, base + ["geometry.size=32", "geometry.multiple=1"])
    assert [s.name for s in scale.sources] == ["images", "heldout_images"] and scale.geometry.size == 64
    assert pixel.geometry.size == 32 and "geometry.size=32 geometry.multiple=1" in recipe.read_text()


@pytest.mark.slow
def test_a_model_trains_on_both_kinds_and_generates_each(two_kinds, tmp_path):
    """One tiny model on a 1:1 mix of VQ-code and palette-pixel documents: held-out image loss falls on each source;
    `loom generate` draws VQ images from one source's vocabulary and palette images from the other's; the
    decoder exports to LlamaForCausalLM and the Emu3 export (one Emu3VQVAE) is refused by name."""
    from PIL import Image

    train, heldout, run = two_kinds / "train" / "tokens", two_kinds / "heldout" / "tokens", tmp_path / "run"
    result = run_loom("train", REPO / "configs" / "tiny.yaml", f"out_dir={run}", "parallel.nproc_per_node=1",
                      f"data.sources.shapes.path={train / 'codes'}", f"data.sources.pixels.path={train / 'pixels'}",
                      "data.sources.pixels.weight=1", f"eval.sources.shapes.path={heldout / 'codes'}",
                      f"eval.sources.pixels.path={heldout / 'pixels'}", "eval.sources.pixels.weight=1",
                      "data.seq_len=384", "schedule.steps=40", "eval.interval=40", "eval.sequences=8",
                      "checkpoint.interval=40", "samples.interval=0")
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    for name in ("shapes", "pixels"):
        before, after = (evals[i]["eval_by_source"][name]["loss"]["image"] for i in (0, -1))
        assert after < 0.7 * before, (name, before, after)

    colours = {tuple(c) for c in PaletteTokenizer.from_pretrained(two_kinds / "palette").palette.tolist()}
    for data, size in ((train / "codes", 32), (train / "pixels", 16)):
        out = tmp_path / data.name
        gen = run_loom("generate", run, "--mode", "image", "--prompt", "A red circle.", "--n", "1",
                       "--data", data, "--out", out)
        assert gen.returncode == 0, gen.stderr[-3000:]
        image = Image.open(next(out.glob("*.png"))).convert("RGB")
        assert image.size == (size, size)
        if data.name == "pixels":
            assert {tuple(c) for c in np.asarray(image).reshape(-1, 3).tolist()} <= colours

    assert run_loom("convert", "to-hf", run, tmp_path / "hf", "--format", "llama").returncode == 0
    emu3 = run_loom("convert", "to-hf", run, tmp_path / "emu3", "--format", "emu3")
    assert emu3.returncode != 0 and "holds several visual tokenizers (main, palette)" in emu3.stderr
