"""The visual tokenizer: codes against transformers, images and videos of any length and shape,
training (loss, dead codes, EMA, resume, DDP), HF round trips, bad input, evaluation."""

import io
import json
import shutil

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

from data_pipeline.media import Geometry, MediaError, decode_image, encode_mp4, encode_png, read_video
from data_pipeline.shapes import make_document, render
from data_pipeline.shards import ShardWriter
from data_pipeline.visual_tokenizer import VisualTokenizer, to_pixels
from data_pipeline.vq_config import VQModelConfig, load_vq_config
from data_pipeline.vq_eval import ssim
from data_pipeline.vq_train import CodebookKeeper, build_tokenizer, train_vq

from conftest import run_loom

QUIET = lambda m: None  # noqa: E731


def tiny_tokenizer(seed=0, **model) -> VisualTokenizer:
    torch.manual_seed(seed)
    return VisualTokenizer(Emu3VQVAE(VQModelConfig(codebook_size=64, **model).hf_config())).eval()


def transformers_codes(vq: Emu3VQVAE, pixels: torch.Tensor) -> torch.Tensor:
    """transformers' submodule path: encoder -> quant_conv -> quantize, on (B, T, 3, H, W)."""
    with torch.no_grad():
        hidden = vq.encoder(pixels)                                              # (B, t, C, h, w)
        hidden = vq.quant_conv(hidden.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
        return vq.quantize(hidden)


def vq_config(tmp_path, raw, *overrides):
    return load_vq_config(None, [f"out_dir={tmp_path / 'vq'}", f"data.raw=[{raw}]", "model.codebook_size=64",
                                 "optim.batch_size=8", "optim.video_batch_size=2", "logging.interval=5",
                                 "logging.tensorboard=false", "threads=2", *overrides])


def test_image_and_video_codes_equal_transformers_submodule_path():
    tok = tiny_tokenizer()
    img = render([{"shape": "circle", "color": "blue", "cx": 0.5, "cy": 0.5, "r": 0.2}], 32)
    pixels = to_pixels(img[None])
    # an image: Loom encodes the still once; transformers sees it repeated 4 times, and its encode() agrees
    expected = transformers_codes(tok.vq, pixels[None].repeat(1, 4, 1, 1, 1))[0, 0]
    assert np.array_equal(tok.encode_image(img), expected.numpy())
    with torch.no_grad():
        hf = tok.vq.encode(pixels, image_sizes=torch.tensor([[32, 32]])).image_tokens[0]
    assert np.array_equal(tok.encode_image(img), hf.numpy())
    # decoding an image is the first of the 4 frames transformers' decoder makes
    codes = torch.as_tensor(tok.encode_image(img))[None, None]
    with torch.no_grad():
        full = tok.vq.decode(codes)                                               # (1, 4, 3, 32, 32)
    assert torch.allclose(tok.decode(codes, image=True)[0, 0], full[0, 0].clamp(-1, 1), atol=1e-5)
    # a portrait video keeps its (h, w) grid; transformers' encode() would crop it (DESIGN §3)
    tall = np.random.default_rng(0).integers(0, 255, (8, 48, 32, 3), dtype=np.uint8)
    ours = tok.encode_video(tall)
    assert ours.shape == (2, 6, 4)
    assert np.array_equal(ours, transformers_codes(tok.vq, to_pixels(tall)[None])[0].numpy())


@pytest.mark.parametrize("frames, latent", [(4, 1), (8, 2), (12, 3)])
def test_video_frame_counts_give_latent_frames(frames, latent):
    tok = tiny_tokenizer()
    clip = np.random.default_rng(frames).integers(0, 255, (frames, 32, 48, 3), dtype=np.uint8)
    codes = tok.encode_video(clip)
    assert codes.shape == (latent, 4, 6)
    assert tok.decode_video(codes).shape == (frames, 32, 48, 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        tok.encode_video(clip[:frames - 1])


def test_videos_of_any_length_and_fps_are_sampled_to_the_configured_frames():
    rng = np.random.default_rng(0)
    for length, fps in [(5, 5), (30, 24), (61, 30)]:
        frames = rng.integers(0, 255, (length, 24, 40, 3), dtype=np.uint8)
        video = read_video(encode_mp4(frames, fps), 8, Geometry(mode="budget", max_pixels=32 * 48))
        assert video.frames.shape == (8, 24, 40, 3) and video.seconds == pytest.approx(length / fps, rel=0.05)
    tall = read_video(encode_mp4(rng.integers(0, 255, (9, 64, 32, 3), dtype=np.uint8)), 4,
                      Geometry(mode="budget", max_pixels=16 * 32))
    assert tall.frames.shape == (4, 32, 16, 3)  # aspect kept, sides multiples of 8


def test_geometry_crop_and_pixel_budget():
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 24:40] = 255                      # a white band in the middle
    assert decode_image(encode_png(wide), Geometry(mode="crop", size=16)).shape == (16, 16, 3)
    center = decode_image(encode_png(wide), Geometry(mode="crop", size=32))
    assert center[:, 8:24].min() == 255       # center crop keeps the band
    assert decode_image(encode_png(wide), Geometry(mode="budget", max_pixels=1024)).shape == (16, 40, 3)
    small = decode_image(encode_png(wide), Geometry(mode="budget", max_pixels=64 * 64))
    assert small.shape == (32, 64, 3)         # under budget: unchanged
    with pytest.raises(ValueError, match="crop"):
        Geometry(mode="stretch")


def test_ssim_and_psnr_sanity():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(4))
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert (ssim(x, noisy) < 0.9).all()


def test_training_lowers_loss_and_restarts_dead_codes(world):
    cfg = load_vq_config(None, [f"data.raw=[{world / 'raw'}]", "model.codebook_size=64"])
    tok = build_tokenizer(cfg).train()
    keeper = CodebookKeeper(tok, cfg)
    img = np.stack([render([{"shape": s, "color": c, "cx": 0.5, "cy": 0.5, "r": 0.25}], 32)
                    for s in ("circle", "square") for c in ("red", "blue", "green", "yellow")])
    pixels = to_pixels(img)[:, None]                                           # (8, 1, 3, 32, 32)
    optimizer = torch.optim.Adam(tok.parameters(), lr=2e-3)
    losses = []
    for step in range(1, 16):
        loss, stats = tok.training_loss(pixels, 0.25)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tok.project_codebook()
        losses.append(stats["recon"].item())
    assert losses[-1] < 0.7 * losses[0]
    # codes no latent is near: all but a few are dead; a restart moves them onto this batch's latents
    with torch.no_grad():
        tok.codebook.copy_(-tok.codebook.abs() - 1)
        tok.codebook[:2] = torch.randn(2, tok.codebook.shape[1])
        tok.project_codebook()
        _, stats = tok.training_loss(pixels, 0.25)
    used_before = stats["codes"].unique().numel()
    keeper.update(cfg.codebook.restart_dead_every, stats["codes"], stats["vectors"])
    assert keeper.restarted == 64 - used_before >= 56
    assert torch.allclose(tok.codebook.norm(dim=1), torch.ones(64))          # l2 codes stay on the sphere
    with torch.no_grad():
        _, after = tok.training_loss(pixels, 0.25)
    assert after["codes"].unique().numel() > 4 * used_before


def test_ema_codebook_update(world, tmp_path):
    cfg = vq_config(tmp_path, world / "raw", "codebook.update=ema", "optim.steps=6", "data.eval_clips=8")
    summary = train_vq(cfg, log=QUIET)
    before = build_tokenizer(cfg).codebook
    after = VisualTokenizer.from_pretrained(tmp_path / "vq").codebook
    assert not torch.allclose(before, after) and summary["steps"] == 6
    assert torch.allclose(after.norm(dim=1), torch.ones(64), atol=1e-5)


def test_checkpoint_resume_is_exact(world, tmp_path):
    cfg = vq_config(tmp_path, world / "raw", "optim.steps=10", "checkpoint.interval=5",
                    "codebook.restart_dead_every=3", "data.eval_clips=8")
    train_vq(cfg, log=QUIET)
    first = VisualTokenizer.from_pretrained(tmp_path / "vq").vq.state_dict()
    # as if the job died after the step-5 checkpoint
    shutil.rmtree(tmp_path / "vq" / "checkpoints" / "step_000010")
    (tmp_path / "vq" / "model.safetensors").unlink()
    logs = []
    train_vq(cfg, log=logs.append)
    assert any("resumed from" in line and "step_000005" in line for line in logs)
    again = VisualTokenizer.from_pretrained(tmp_path / "vq").vq.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_hf_round_trip_and_emu3_model_directory(tmp_path):
    tok = tiny_tokenizer(seed=3)
    with torch.no_grad():  # unit-length codes, as l2 training leaves them
        tok.codebook.copy_(torch.nn.functional.normalize(torch.randn_like(tok.codebook), dim=1))
    tok.save_pretrained(tmp_path / "vq")
    theirs = Emu3VQVAE.from_pretrained(tmp_path / "vq").eval()
    ours = VisualTokenizer.from_pretrained(tmp_path / "vq", l2_codes=True)
    pixels = to_pixels(np.random.default_rng(1).integers(0, 255, (8, 40, 24, 3), dtype=np.uint8))[None]
    assert torch.equal(ours.encode(pixels), transformers_codes(theirs, pixels))   # cosine == Euclidean on unit codes
    img = pixels[:, :1, :, :32, :24]
    with torch.no_grad():
        hf = theirs.encode(img[0], image_sizes=torch.tensor([[32, 24]])).image_tokens[0]
    assert torch.equal(ours.encode(img)[0, 0], hf)
    # an Emu3ForConditionalGeneration directory: only its vqmodel tensors are read
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    config = Emu3Config(vq_config=theirs.config.to_dict(), text_config={
        "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2}, vocabulary_map={"<image>": 3})
    model = Emu3ForConditionalGeneration(config)
    model.model.vqmodel.load_state_dict(theirs.state_dict())
    model.save_pretrained(tmp_path / "emu3")
    from_model = VisualTokenizer.from_pretrained(tmp_path / "emu3")
    assert torch.equal(from_model.encode(pixels), ours.encode(pixels))


def write_bad_inputs(raw):
    """One shard with every kind of bad input next to good ones; returns the expected skip counts."""
    def image_doc(key, member_bytes, ext="png"):
        segments = [{"text": "a picture"}, {"image": f"img.{ext}"}]
        return {"__key__": key, "json": json.dumps({"segments": segments}).encode(), f"img.{ext}": member_bytes}

    def pil_bytes(img, fmt="PNG"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    empty = io.BytesIO()
    with av.open(empty, mode="w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()
    rgb = render([{"shape": "square", "color": "red", "cx": 0.5, "cy": 0.5, "r": 0.3}], 32)
    good_png = encode_png(rgb)
    with ShardWriter(raw, "bad", max_count=None) as w:
        for i in range(6):
            w.write(make_document(i, 0))
        w.write(image_doc("gray", pil_bytes(Image.fromarray(rgb).convert("L"))))
        w.write(image_doc("palette", pil_bytes(Image.fromarray(rgb).convert("P"))))
        w.write(image_doc("cmyk", pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG"), "jpg"))
        w.write(image_doc("alpha", pil_bytes(Image.fromarray(rgb).convert("RGBA"))))
        w.write(image_doc("tiny", encode_png(np.zeros((4, 4, 3), np.uint8))))
        w.write(image_doc("huge", encode_png(np.zeros((600, 600, 3), np.uint8))))
        w.write(image_doc("sliver", encode_png(np.zeros((10, 3000, 3), np.uint8))))
        w.write(image_doc("truncated", good_png[: len(good_png) // 2]))
        w.write(image_doc("garbage", b"not an image at all"))
        for key, data in (("noframes", empty.getvalue()), ("badvideo", b"\x00" * 64)):
            w.write({"__key__": key, "json": json.dumps({"segments": [{"video": "clip.mp4"}]}).encode(),
                     "clip.mp4": data})
    return {"image_too_small": 1, "image_too_large": 1, "image_aspect_ratio": 1, "bad_image": 2,
            "video_no_frames": 1, "bad_video": 1}


def test_bad_inputs_are_converted_or_skipped_and_counted(tmp_path):
    expected = write_bad_inputs(tmp_path / "raw")
    cfg = vq_config(tmp_path, tmp_path / "raw", "optim.steps=2", "data.eval_clips=0",
                    "data.geometry.max_source_pixels=100000")
    summary = train_vq(cfg, log=QUIET)
    assert summary["skipped"]["by_reason"] == expected
    media = sum(1 for i in range(6) for seg in json.loads(make_document(i, 0)["json"])["segments"]
                if "image" in seg or "video" in seg)
    assert summary["clips"] == media + 4  # the gray, palette, CMYK and alpha images are converted and used


@pytest.mark.slow
def test_two_process_ddp_training_resumes_and_eval_cli(world, tmp_path):
    common = [f"out_dir={tmp_path / 'vq'}", f"data.raw=[{world / 'raw'}]", "model.codebook_size=64",
              "optim.steps=8", "optim.batch_size=8", "optim.video_batch_size=2", "checkpoint.interval=4",
              "logging.interval=4", "logging.eval_interval=4", "nproc_per_node=2", "optim.bf16=true",
              "data.geometry.size=32"]
    out = run_loom("data", "visual-tokenizer", "train", "configs/visual_tokenizer/quickstart.yaml", *common)
    assert out.returncode == 0, out.stderr[-3000:]
    out = out.stdout
    assert "(2 process(es))" in out and "vq step 8/8" in out
    first = VisualTokenizer.from_pretrained(tmp_path / "vq").vq.state_dict()
    assert (tmp_path / "vq" / "tensorboard").is_dir()
    records = [json.loads(line) for line in (tmp_path / "vq" / "metrics.jsonl").read_text().splitlines()]
    assert {"codebook/usage", "codebook/perplexity", "psnr"} <= set(records[0])
    assert any("eval/ssim" in r for r in records)
    shutil.rmtree(tmp_path / "vq" / "checkpoints" / "step_000008")
    out = run_loom("data", "visual-tokenizer", "train", "configs/visual_tokenizer/quickstart.yaml", *common)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout
    again = VisualTokenizer.from_pretrained(tmp_path / "vq").vq.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)

    out = run_loom("data", "visual-tokenizer", "eval", str(tmp_path / "vq"), "--data", str(world / "raw"),
                   "--out", str(tmp_path / "eval.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["codes_per_image"] == 16 and result["grid_tokens_per_image"] == 4 * 5 + 1
    assert result["codes_per_video_second"] == pytest.approx(2 * 16, rel=0.05)  # 8 frames at 8 fps, 2 x 4x4 codes
    assert 0 < result["ssim"] <= 1 and result["psnr"] > 5 and 1 <= result["perplexity"] <= 64
    assert "visual tokenizer eval:" in out.stdout


def test_media_error_reasons():
    with pytest.raises(MediaError) as e:
        decode_image(b"nope")
    assert e.value.reason == "bad_image"


def test_training_starts_from_released_weights(world, tmp_path):
    released = tiny_tokenizer(seed=5)          # an Emu3VQVAE whose codebook rows are not unit length
    released.save_pretrained(tmp_path / "released")
    cfg = vq_config(tmp_path, world / "raw", f"model.from_pretrained={tmp_path / 'released'}")
    with pytest.raises(ValueError, match="l2_normalize=false"):
        build_tokenizer(cfg)
    cfg = vq_config(tmp_path, world / "raw", f"model.from_pretrained={tmp_path / 'released'}",
                    "codebook.l2_normalize=false", "optim.steps=2", "data.eval_clips=4")
    start = build_tokenizer(cfg).vq.state_dict()
    assert all(torch.equal(v, released.vq.state_dict()[k]) for k, v in start.items())
    summary = train_vq(cfg, log=QUIET)
    assert summary["steps"] == 2 and summary["codebook_size"] == 64


def test_tokenize_counts_bad_inputs_and_decoding_workers_keep_the_output(world, tmp_path):
    from data_pipeline.tokenize_job import tokenize

    expected = write_bad_inputs(tmp_path / "raw")
    shutil.copy(world / "raw" / "raw-00000.tar", tmp_path / "raw" / "good.tar")
    args = (world / "tok" / "text_tokenizer.model", world / "tok" / "vq",
            Geometry(size=32, max_source_pixels=100000), 8)
    outputs = {}
    for workers in (0, 2):
        m = tokenize([tmp_path / "raw"], tmp_path / f"tokens{workers}", *args, log=QUIET, workers=workers)
        assert m["skipped"] == expected and m["documents"] == 6 + 4 + 40
        outputs[workers] = {p.name: p.read_bytes() for p in (tmp_path / f"tokens{workers}").glob("*.tar")}
    assert outputs[0] == outputs[2] and len(outputs[0]) == 2
