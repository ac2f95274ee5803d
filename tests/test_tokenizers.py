import json

import numpy as np
import torch

from data_pipeline.shapes import render
from data_pipeline.text_tokenizer import TextTokenizer
from data_pipeline.visual_tokenizer import VQTrainConfig, VisualTokenizer, to_pixels


def test_text_tokenizer_has_byte_fallback(world):
    tok = TextTokenizer(world / "tok" / "text_tokenizer.model")
    assert tok.vocab_size == 400
    for text in ["two red squares on the left", "Ünïcødé 猫 🙂", "4*4"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("three blue circles")) < len("three blue circles") // 2  # merges learned


def test_visual_tokenizer_codes_match_transformers(world):
    vq = VisualTokenizer.from_pretrained(world / "tok" / "vq")
    img = render([{"shape": "circle", "color": "blue", "cx": 0.5, "cy": 0.5, "r": 0.2}], 32)
    ours = vq.encode_image(img)
    assert ours.shape == (4, 4) and ours.max() < vq.codebook_size
    with torch.no_grad():
        pixels = to_pixels(img[None])  # (1, 3, 32, 32)
        theirs = vq.vq.encode(pixels, image_sizes=torch.tensor([[32, 32]])).image_tokens[0]
    assert np.array_equal(ours, theirs.numpy())


def test_visual_tokenizer_images_and_clips_roundtrip_shapes(world):
    vq = VisualTokenizer.from_pretrained(world / "tok" / "vq")
    img = render([{"shape": "square", "color": "red", "cx": 0.3, "cy": 0.3, "r": 0.2}], 32)
    assert vq.decode_image(vq.encode_image(img)).shape == (32, 32, 3)
    clip = np.stack([img] * 4)
    codes = vq.encode_video(clip)
    assert codes.shape == (1, 4, 4)
    assert vq.decode_video(codes).shape == (4, 32, 32, 3)
    tall = np.zeros((8, 48, 32, 3), np.uint8)  # taller than wide: transformers' encode() crops this wrongly
    assert vq.encode_video(tall).shape == (2, 6, 4)


def test_visual_tokenizer_training_reduces_loss_and_saves_hf_format(tmp_path, world):
    from data_pipeline.visual_tokenizer import train_visual_tokenizer

    summary = train_visual_tokenizer([world / "raw"], tmp_path / "vq", VQTrainConfig(steps=20, batch_size=8),
                                     log=lambda m: None)
    assert summary["final_loss"] < 1.0 and summary["psnr"] > 8
    assert json.loads((tmp_path / "vq" / "config.json").read_text())["model_type"] == "emu3_vqgan"
    from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

    reloaded = Emu3VQVAE.from_pretrained(tmp_path / "vq")
    ours = VisualTokenizer.from_pretrained(tmp_path / "vq")
    for a, b in zip(reloaded.state_dict().values(), ours.vq.state_dict().values()):
        assert torch.equal(a, b)
