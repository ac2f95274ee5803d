"""Generation: KV cache against recomputation, the enforced image/video layout, guidance, the samplers;
ShapesEval's scorer against rendered truth and noise; the CLI on a TP2xPP2 checkpoint."""

import json
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_MODEL, run_loom


@pytest.fixture(scope="module")
def generator(world, groups):
    """An untrained tiny model with the world's tokenizers (weights do not matter for these checks)."""
    from data_pipeline.text_tokenizer import TextTokenizer
    from data_pipeline.visual_tokenizer import VisualTokenizer
    from data_pipeline.vocab import Vocabulary
    from pretrain.config import load_config
    from analysis.generate import Generator
    from pretrain.model import Transformer
    from pretrain.parallel import tensor_parallel_of

    vocabulary = Vocabulary.from_dict(json.loads((world / "tokens" / "vocab.json").read_text())["layout"])
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*TINY_MODEL, f"model.vocab_size={vocabulary.size}",
                                                       f"data.sources.shapes.path={world / 'tokens'}"])
    model = Transformer(cfg.model, tensor_parallel_of(cfg), seed=0).eval()
    return Generator(model, TextTokenizer(world / "tok" / "text_tokenizer.model"), vocabulary,
                     VisualTokenizer.from_pretrained(world / "tok" / "vq"), image_size=32)


PROMPTS = ["A red circle on the left.", "Three blue squares at the top.", "A"]  # lengths differ: left padding


def test_kv_cache_equals_full_recomputation(generator):
    from analysis.generate import Sampling, left_pad
    from pretrain.model import KVCache

    s = Sampling(temperature=1.0, cfg_scale=2.0, seed=3)
    cached = generator.image_codes(PROMPTS, s)
    assert np.array_equal(cached, generator.image_codes(PROMPTS, s, use_cache=False))
    text = Sampling(temperature=0.8, top_k=20, max_new_tokens=12, seed=1)
    assert generator.continue_text(PROMPTS, text) == generator.continue_text(PROMPTS, text, use_cache=False)

    # logits: a prefill of the padded prompts plus 5 cached steps equal one pass over everything
    model, cfg = generator.model, generator.model.cfg
    rows = [generator.text.encode(p) for p in PROMPTS]
    tokens, positions, doc_ids = left_pad(rows, 0, "cpu")
    extra = torch.randint(0, cfg.vocab_size, (3, 5))
    with torch.no_grad():
        full = model(torch.cat([tokens, extra], 1), torch.cat([positions, positions[:, -1:] + 1 + torch.arange(5)], 1),
                     torch.cat([doc_ids, torch.zeros_like(extra)], 1))
        cache = KVCache(cfg.n_layers, 3, tokens.shape[1] + 5, cfg.n_kv_heads, cfg.head_dim, torch.float32, "cpu")
        steps = [model(tokens, positions, doc_ids, cache)]
        for i in range(5):
            steps.append(model(extra[:, i:i + 1], positions[:, -1:] + 1 + i, torch.zeros_like(extra[:, :1]), cache))
    last = full[tokens.shape[1] - 1:]                                      # the positions each step predicts from
    real = torch.isfinite(last)
    assert torch.cat(steps).shape == last.shape and torch.allclose(torch.cat(steps)[real], last[real], atol=1e-5)


def test_constrained_sampling_yields_decodable_grids(generator):
    from analysis.generate import VISUAL, Sampling

    L = generator.vocabulary
    for grid in [(4, 4), (2, 3), (3, 1)]:
        codes = generator.image_codes(PROMPTS, Sampling(temperature=1.5, seed=7), grid)
        assert codes.shape == (3, *grid) and codes.min() >= 0 and codes.max() < L.codebook_size
        pixels = generator.visual.decode_image(codes[0])
        assert pixels.shape == (8 * grid[0], 8 * grid[1], 3) and pixels.dtype == np.uint8
    template = generator.grid_template(2, 2, 3, "<|video end|>")
    eol, eof = L.special("<|eol|>"), L.special("<|eof|>")
    assert template == ([VISUAL] * 3 + [eol]) * 2 + [eof] + ([VISUAL] * 3 + [eol]) * 2 + [eof] + \
        [L.special("<|video end|>")]
    videos = generator.videos(PROMPTS[:2], Sampling(seed=1), frames=8, grid=(2, 2))
    assert [v.shape for v in videos] == [(8, 16, 16, 3)] * 2
    with pytest.raises(ValueError, match="multiple of 4"):
        generator.videos(PROMPTS[:1], Sampling(), frames=6)
    captions = generator.caption([np.full((32, 32, 3), 200, np.uint8)], Sampling(max_new_tokens=5))
    assert len(captions) == 1 and isinstance(captions[0], str)


def test_guidance_scale_one_equals_no_guidance(generator):
    from analysis.generate import Sampling, guide, sample_tokens

    cond = torch.randn(4, 50)
    cond[:, -3:] = float("-inf")
    uncond = torch.randn(4, 50)
    uncond[:, -3:] = float("-inf")
    assert torch.equal(guide(cond, uncond, 1.0), cond)
    assert torch.isfinite(guide(cond, uncond, 3.0)[:, :-3]).all()

    L = generator.vocabulary
    prompts = [generator.visual_prompt(p, "<|image start|>", (4, 4)) for p in PROMPTS]
    negative = [generator.visual_prompt("", "<|image start|>", (4, 4))] * 3
    template = generator.grid_template(1, 4, 4, "<|image end|>")
    pad = L.special("<|pad|>")
    plain = sample_tokens(generator.model, prompts, template, generator.visual_mask, Sampling(seed=5), pad)
    guided = sample_tokens(generator.model, prompts, template, generator.visual_mask,
                           Sampling(seed=5, cfg_scale=1.0), pad, uncond=negative)
    assert torch.equal(plain, guided)
    stronger = sample_tokens(generator.model, prompts, template, generator.visual_mask,
                             Sampling(seed=5, cfg_scale=4.0), pad, uncond=negative)
    assert not torch.equal(plain, stronger)


def test_top_k_and_top_p_filtering():
    from analysis.sampling import Sampling, filter_logits, next_tokens

    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.1, 5.0, 4.9]])
    kept = torch.isfinite(filter_logits(logits, Sampling(top_k=2)))
    assert kept.tolist() == [[False, True, True, False], [False, False, True, True]]
    # probabilities of row 0: 0.09, 0.67, 0.24, 0.03: top_p 0.8 keeps the two largest
    kept = torch.isfinite(filter_logits(logits, Sampling(top_p=0.8)))
    assert kept[0].tolist() == [False, True, True, False]
    g = torch.Generator().manual_seed(0)
    assert next_tokens(logits, Sampling(top_k=1), g).tolist() == [1, 2]
    assert next_tokens(logits, Sampling(temperature=0), g).tolist() == [1, 2]


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_scorer_is_right_on_rendered_truth_and_near_zero_on_noise(size):
    from data_pipeline.shapes import render
    from analysis.shapes_eval import CATEGORIES, detect_objects, make_prompts, score

    rng = np.random.default_rng(0)
    for category in CATEGORIES:
        items = make_prompts(category, 60, seed=size)
        truth = [score(it, detect_objects(render(it["objects"], size))) for it in items]
        assert all(truth), (category, [it["prompt"] for it, ok in zip(items, truth) if not ok][:3])
        noise = [score(it, detect_objects(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))) for it in items]
        chance = {"colors": 1 / 5, "single_object": 1 / 3, "counting": 1 / 2}.get(category, 1 / 6)
        assert np.mean(noise) <= chance, category


def contradict(item: dict, rng) -> list[dict]:
    """The objects of `item` changed in exactly the attribute its category checks."""
    import copy

    from analysis.shapes_eval import COLOR_NAMES
    from data_pipeline.shapes import POSITIONS, SHAPES, group_objects

    objects, expect = copy.deepcopy(item["objects"]), item["expect"]
    category = item["category"]
    if category == "single_object":  # another shape
        objects[0]["shape"] = rng.choice([s for s in SHAPES if s != expect["shape"]])
    elif category == "two_objects":  # the second object of a shape the prompt does not name
        objects[1]["shape"] = next(s for s in SHAPES if s not in expect["shapes"])
    elif category == "counting":  # one object more or fewer, same shape, color and place
        cx, cy = (np.mean([o[axis] for o in objects]) for axis in ("cx", "cy"))  # the group's place
        position = min(POSITIONS, key=lambda p: abs(POSITIONS[p][0] - cx) + abs(POSITIONS[p][1] - cy))
        objects = group_objects(rng, objects[0]["shape"], objects[0]["color"], 3 if len(objects) == 2 else 2, position)
    elif category == "colors":  # another color
        for o in objects:
            o["color"] = rng.choice([c for c in COLOR_NAMES if c != expect["color"]])
    elif category == "position":  # the two objects swap places
        for axis in ("cx", "cy"):
            objects[0][axis], objects[1][axis] = objects[1][axis], objects[0][axis]
    elif category == "color_attribution":  # the two shapes swap colors
        objects[0]["color"], objects[1]["color"] = objects[1]["color"], objects[0]["color"]
    return objects


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_scorer_fails_renderings_that_contradict_the_prompt(size):
    """Negative controls: a scorer that ignored shape, count, color or position would pass the truth and
    noise; here every category's one contradicted attribute must score 0."""
    import random

    from data_pipeline.shapes import render
    from analysis.shapes_eval import CATEGORIES, detect_objects, make_prompts, score

    rng = random.Random(size)
    for category in CATEGORIES:
        items = make_prompts(category, 40, seed=size + 1)
        wrong = [score(it, detect_objects(render(contradict(it, rng), size))) for it in items]
        assert not any(wrong), (category, [it["prompt"] for it, ok in zip(items, wrong) if ok][:3])


@pytest.mark.slow
def test_generate_command_and_background_shapes_eval_on_a_tp2_pp2_checkpoint(sources, tmp_path):
    from PIL import Image

    from pretrain.config import load_config
    from analysis.samples import BackgroundSampler

    run = sources / "tp2-pp2-zero1"
    image = run_loom("generate", run, "--mode", "image", "--prompt", "A red circle on the left.", "A blue square.",
                     "--n", "2", "--grid", "2x3", "--bf16", "--out", tmp_path / "img")
    assert image.returncode == 0, image.stderr[-3000:]
    files = sorted((tmp_path / "img").glob("*.png"))
    assert len(files) == 4 and Image.open(files[0]).size == (24, 16)
    assert "generate: 4 image samples" in image.stdout

    # in fp32 the command draws exactly what the Generator API draws for the same prompts, sampling and seed
    # (the API is held to transformers' generate in test_convert); two samples of one prompt differ
    from analysis.generate import Generator, Sampling
    from data_pipeline.media import decode_image

    prompts = ["A red circle on the left."] * 2 + ["A blue square."] * 2
    fp32 = run_loom("generate", run, "--mode", "image", "--prompt", *dict.fromkeys(prompts), "--n", "2",
                    "--temperature", "1", "--cfg-scale", "3", "--seed", "5", "--out", tmp_path / "fp32")
    assert fp32.returncode == 0, fp32.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "fp32" / "samples.jsonl").read_text().splitlines()]
    expected = Generator.from_checkpoint(run).images(prompts, Sampling(temperature=1, cfg_scale=3, seed=5))
    assert [r["prompt"] for r in records] == prompts
    for record, rgb in zip(records, expected):
        assert np.array_equal(decode_image((tmp_path / "fp32" / record["file"]).read_bytes()), rgb), record
    assert len({rgb.tobytes() for rgb in expected}) == 4

    # what the training loop does at a checkpoint: `loom eval shapes` in a child, one at a time
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"out_dir={tmp_path / 'run'}", f"data.sources.shapes.path={run}", "checkpoint.interval=3",
        "samples.interval=3", "samples.shapes_eval_per_category=2", "samples.cfg_scale=2",
        "samples.prompts=['A green triangle in the center.']"])
    messages = []
    sampler = BackgroundSampler(cfg, True, [sys.executable, "-m", "launch.cli"], messages.append)
    assert sampler.due(3, last=False) and not sampler.due(4, last=False) and sampler.due(4, last=True)
    sampler.start(run / "checkpoints" / "step_000003", 3)
    sampler.start(run / "checkpoints" / "step_000006", 6)
    accuracy = sampler.wait()
    assert messages[0] == "samples: still drawing from step 3; none for step 6"
    out = tmp_path / "run" / "shapes_eval" / "step_000003"
    report = json.loads((out / "shapes_eval.json").read_text())
    assert report["accuracy"] == accuracy and report["step"] == 3
    assert set(accuracy) == {"single_object", "two_objects", "counting", "colors", "position", "color_attribution",
                             "overall"}
    assert len(report["samples"]) == 12 and (out / "prompt_00.png").exists() and (out / "colors.png").exists()
    assert "eval shapes: 13 images" in (out / "log.txt").read_text()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*.samples"))
    assert not (tmp_path / "run" / "shapes_eval" / "step_000006").exists()
