"""The pixel visual kind (issue 20, items 1-2): the palette tokenizer and its token shards."""

import json

import numpy as np

from conftest import assert_image_grid, run_loom, spans_of
from data_pipeline.media import Geometry
from data_pipeline.palette import PaletteTokenizer, train_palette
from data_pipeline.shards import read_json
from data_pipeline.text_tokenizer import TextTokenizer
from data_pipeline.tokenize_job import tokenize
from data_pipeline.visual_tokenizer import VisualTokenizer, load_visual_tokenizer
from data_pipeline.vocab import Vocabulary, fingerprint


def test_an_image_in_the_palette_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (512, 3), dtype=np.uint8)
    image = palette[rng.integers(0, 512, (2, 32, 32))]                       # (2, 32, 32, 3), only palette colours
    tok = PaletteTokenizer(palette)
    tok.save_pretrained(tmp_path / "p")
    loaded = load_visual_tokenizer(tmp_path / "p")
    assert isinstance(loaded, PaletteTokenizer) and loaded.codebook_size == 512 and loaded.spatial == 1
    assert (loaded.decode_image(loaded.encode_images(image)) == image).all()
    assert (loaded.decode_video(loaded.encode_video(image)) == image).all()


def test_kmeans_finds_the_colours_the_pixels_come_from():
    rng = np.random.default_rng(1)
    centres = np.array([[20, 30, 200], [220, 40, 40], [40, 170, 60], [245, 245, 245]])
    pixels = np.clip(centres[rng.integers(0, 4, 20000)] + rng.integers(-3, 4, (20000, 3)), 0, 255).astype(np.uint8)
    palette, summary = train_palette(pixels, 4, seed=0)
    found = sorted(map(tuple, palette.astype(int)))
    assert all(np.abs(np.array(f) - np.array(c)).max() <= 1 for f, c in zip(found, sorted(map(tuple, centres))))
    assert summary["rmse"] < 2.5  # the noise is uniform on -3..3: its RMSE is 2
    few = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
    exact, summary = train_palette(few, 8)
    assert summary == {"colours": 2, "iterations": 0, "rmse": 0.0} and len(exact) == 8
    assert (PaletteTokenizer(exact).encode_images(few) == [0, 1]).all()


def test_the_visual_kind_is_in_the_layout_only_when_it_is_pixels():
    tokens, pixels = Vocabulary.for_text(400, 512), Vocabulary.for_text(400, 512, visual_kind="pixel")
    assert "visual_kind" not in tokens.to_dict() and pixels.to_dict()["visual_kind"] == "pixel"
    assert Vocabulary.from_dict(json.loads(json.dumps(pixels.to_dict()))) == pixels
    assert VisualTokenizer.kind == "token" and PaletteTokenizer.kind == "pixel"


def test_loom_data_palette_then_tokenize_writes_one_token_per_pixel(world, tmp_path):
    """The CLI trains a palette on the shapes world; tokenizing with it lays every pixel out in rows."""
    out = run_loom("data", "palette", "--raw", world / "raw", "--out", tmp_path / "palette", "--size", "64",
                   "--image-size", "16", "--max-images", "100")
    assert out.returncode == 0, out.stderr
    assert "palette: 64 colours" in out.stdout and "-> " in out.stdout
    config = json.loads((tmp_path / "palette" / "config.json").read_text())
    assert config["visual_kind"] == "pixel" and config["images"] == 100 and config["image_size"] == 16
    vq_eval = run_loom("data", "visual-tokenizer", "eval", tmp_path / "palette", "--data", world / "raw")
    assert vq_eval.returncode != 0 and "is a palette (the pixel kind), not a VQ" in vq_eval.stderr

    text_model = world / "tok" / "text_tokenizer.model"
    manifest = tokenize([world / "raw"], tmp_path / "px" / "tokens", text_model, tmp_path / "palette",
                        Geometry(size=16, multiple=1), 8, log=lambda *a: None)
    L = Vocabulary.from_dict(manifest["layout"])
    assert L.visual_kind == "pixel" and L.codebook_size == 64 and manifest["skipped"] == {}
    token_kind = read_json(world / "tokens" / "manifest.json")
    assert manifest["fingerprint"] != token_kind["fingerprint"]
    assert fingerprint(L, text_model, tmp_path / "palette") == manifest["fingerprint"]

    text, seen = TextTokenizer(text_model), set()
    for kind, span in spans_of(tmp_path / "px" / "tokens", manifest):
        seen.add(kind)
        if kind == "image":
            assert_image_grid(span, L, text, 16, 16)  # one token per pixel
        if kind == "video":
            assert span.count(L.special("<|eof|>")) == 8  # no temporal compression: every frame
    assert seen == {"text", "image", "video"}
