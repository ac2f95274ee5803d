"""The scale kind's tokenizer (VAR's multi-scale residual VQ): maps coarse to fine in one codebook, trained
with the VQ's training step, each added map sharpening held-out images; saved as an HF directory; its
token layout (a <|scale|> marker before each map) and vocabulary. Next-scale training: tests/test_next_scale.py."""

import json

import numpy as np
import pytest
import torch
from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

from common.config import ConfigError
from data_pipeline.text_tokenizer import TextTokenizer
from data_pipeline.tokenize_job import tokenize
from data_pipeline.visual_tokenizer import VisualTokenizer, load_visual_tokenizer
from data_pipeline.vocab import SCALE_MARKER, Vocabulary, fingerprint
from data_pipeline.vq_config import VQModelConfig, load_vq_config
from data_pipeline.vq_train import train_vq

from conftest import run_loom, spans_of

QUIET = lambda m: None  # noqa: E731
MAPS = [1, 2, 4]  # the shapes world's 32x32 images are 4x4 latent grids


def scale_config(tmp_path, raw, *overrides):
    return load_vq_config(None, [f"out_dir={tmp_path / 'vq'}", f"data.raw=[{raw}]", "model.codebook_size=64",
                                 f"model.scale_maps={MAPS}", "codebook.l2_normalize=false", "optim.batch_size=8",
                                 "optim.video_batch_size=2", "logging.tensorboard=false", "threads=2", *overrides])


def test_maps_share_the_codebook_and_decode_coarse_to_fine():
    torch.manual_seed(0)
    tok = VisualTokenizer(Emu3VQVAE(VQModelConfig(codebook_size=32, scale_maps=[1, 2, 3, 4]).hf_config())).eval()
    assert tok.kind == "scale" and tok.map_shapes(4, 8) == [(1, 2), (2, 4), (3, 6), (4, 8)]
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    maps = tok.encode_image(image)
    assert [m.shape for m in maps] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    # the quantized latent is the sum of each map's code vectors, upsampled to the grid
    z = tok.latents(torch.as_tensor(image).permute(2, 0, 1)[None, None].float() / 127.5 - 1)
    codes, ups, _ = tok.quantize_maps(z)
    assert torch.allclose(tok.embed_maps(codes)[:, 0], sum(ups), atol=1e-5)
    assert torch.allclose(tok.embed_maps(codes, upto=1)[0, 0], tok.codebook[int(maps[0][0, 0])][:, None, None]
                          .expand(-1, 4, 4))
    video = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    assert [m.shape for m in tok.encode_video(video)] == [(2, 1, 1), (2, 2, 2), (2, 3, 3), (2, 4, 4)]
    assert tok.decode_video(tok.encode_video(video)).shape == (8, 32, 32, 3)
    with pytest.raises(ValueError, match="l2_normalize=false"):
        VisualTokenizer(tok.vq, l2_codes=True)


@pytest.mark.parametrize("override, message", [
    ("codebook.l2_normalize=true", "needs codebook.l2_normalize=false"),
    ("model.scale_maps=[1,3,2,4]", "increasing sides"),
    ("model.scale_maps=[1,2,8]", "end the list at 4"),
])
def test_bad_scale_maps_are_refused(world, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        scale_config(tmp_path, world / "raw", override)


def test_each_added_map_improves_heldout_reconstruction_and_the_layout_has_a_marker_per_map(world, tmp_path):
    summary = train_vq(scale_config(tmp_path, world / "raw", "optim.steps=400", "data.eval_clips=24"), log=QUIET)
    by_maps = [summary["eval"][f"psnr_maps_{k}"] for k in range(1, len(MAPS) + 1)]
    assert all(b > a + 0.1 for a, b in zip(by_maps, by_maps[1:])), by_maps
    assert by_maps[-1] == pytest.approx(summary["psnr"])

    # an HF directory: transformers loads the weights; Loom reads the maps back from its config
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert config["loom_scale_maps"] == MAPS
    Emu3VQVAE.from_pretrained(tmp_path / "vq")
    tok = load_visual_tokenizer(tmp_path / "vq")
    assert tok.kind == "scale" and tok.scale_maps == MAPS

    text_model = world / "tok" / "text_tokenizer.model"
    manifest = tokenize([world / "raw"], tmp_path / "sc" / "tokens", text_model, tmp_path / "vq", 32, 8, log=QUIET)
    L = Vocabulary.from_dict(manifest["layout"])
    assert (L.visual_kind, L.scale_maps) == ("scale", tuple(MAPS)) and SCALE_MARKER in L.special_tokens
    assert L.size == Vocabulary.for_text(400, 64).size  # the marker takes a reserved id
    assert fingerprint(L, text_model, tmp_path / "vq") == manifest["fingerprint"]
    text, marker, seen = TextTokenizer(text_model), L.special(SCALE_MARKER), set()
    for kind, span in spans_of(tmp_path / "sc" / "tokens", manifest):
        seen.add(kind)
        if kind == "image":
            prefix = [L.special("<|image start|>")] + text.encode("4*4") + [L.special("<|image token|>")]
            assert span[:len(prefix)] == prefix
            body = span[len(prefix):]
            expected = [marker if i in (0, 2, 7) else "code" for i in range(1 + 1 + 1 + 4 + 1 + 16)]
            assert ["code" if t >= L.visual_offset else t for t in body[:-2]] == expected
            assert body[-2:] == [L.special("<|eof|>"), L.special("<|image end|>")]
        if kind == "video":
            assert span.count(marker) == 2 * len(MAPS) and span.count(L.special("<|eof|>")) == 2
    assert seen == {"text", "image", "video"}

    # next-scale models train (tests/test_next_scale.py) but cannot be sampled yet: samples during training are refused
    out = run_loom("train", "configs/tiny.yaml", f"data.sources.shapes.path={tmp_path / 'sc' / 'tokens'}",
                   "parallel.nproc_per_node=1", f"out_dir={tmp_path / 'run'}", "samples.interval=10")
    assert out.returncode != 0 and "set samples.interval=0" in out.stderr, out.stderr[-2000:]
