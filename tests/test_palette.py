"""The pixel visual kind: the palette tokenizer, its token shards, and a model trained, sampled and scored on them."""

import json

import numpy as np
import pytest

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


@pytest.mark.slow
def test_a_model_trains_generates_and_is_scored_on_pixel_shards(world, tmp_path):
    """The pixel kind end to end through the CLI: 32x32 pixel shards train a tiny model whose held-out image loss
    falls well below the untrained model's, `loom generate` decodes its samples through the palette, and
    `loom eval shapes` scores them."""
    from PIL import Image

    from conftest import REPO

    palette = tmp_path / "palette"
    assert run_loom("data", "palette", "--raw", world / "raw", "--out", palette, "--size", "64",
                    "--image-size", "32", "--max-images", "100").returncode == 0
    text_model = world / "tok" / "text_tokenizer.model"
    for raw, out in (("raw", "tokens"), ("heldout_raw", "heldout")):
        tokenize([world / raw], tmp_path / out, text_model, palette, Geometry(size=32, multiple=1), 8,
                 log=lambda *a: None)
    run = tmp_path / "run"
    train = run_loom("train", REPO / "configs" / "tiny.yaml", f"out_dir={run}", "parallel.nproc_per_node=1",
                     f"data.sources.shapes.path={tmp_path / 'tokens'}",
                     f"eval.sources.shapes.path={tmp_path / 'heldout'}", "data.seq_len=1088",
                     "data.global_batch_size=4", "data.micro_batch_size=2", "schedule.steps=40", "eval.interval=40",
                     "checkpoint.interval=40", "samples.interval=0")
    assert train.returncode == 0, train.stderr[-3000:]
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    untrained, trained = evals[0]["eval_loss"]["image"], evals[-1]["eval_loss"]["image"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40 and trained < 0.6 * untrained, (untrained, trained)

    gen = run_loom("generate", run, "--mode", "image", "--prompt", "A red circle.", "--n", "2",
                   "--out", tmp_path / "gen")
    assert gen.returncode == 0, gen.stderr[-3000:]
    files = sorted((tmp_path / "gen").glob("*.png"))
    assert len(files) == 2 and Image.open(files[0]).size == (32, 32)  # one token per pixel
    colours = {tuple(c) for c in PaletteTokenizer.from_pretrained(palette).palette.tolist()}
    assert {tuple(c) for c in np.asarray(Image.open(files[0]).convert("RGB")).reshape(-1, 3).tolist()} <= colours

    shapes = run_loom("eval", "shapes", run, "--n", "1", "--out", tmp_path / "shapes")
    assert shapes.returncode == 0, shapes.stderr[-3000:]
    accuracy = json.loads((tmp_path / "shapes" / "shapes_eval.json").read_text())["accuracy"]
    assert set(accuracy) >= {"counting", "position", "overall"} and 0 <= accuracy["overall"] <= 1

    # the decoder exports as for any kind; an Emu3 export would need a VQ where the palette is
    assert run_loom("convert", "to-hf", run, tmp_path / "hf", "--format", "llama").returncode == 0
    emu3 = run_loom("convert", "to-hf", run, tmp_path / "emu3", "--format", "emu3")
    assert emu3.returncode != 0 and "export its decoder with --format llama" in emu3.stderr
