import json
import shutil

import numpy as np
import pytest

from conftest import assert_image_grid, copy_with_fingerprint
from data_pipeline.shards import ShardWriter, iter_samples, npy_load, read_json
from data_pipeline.shapes import make_document
from data_pipeline.tokenize_job import tokenize
from data_pipeline.vocab import SPECIAL_TOKENS, Vocabulary, fingerprint


def test_vocabulary_layout():
    L = Vocabulary(text_size=400, codebook_size=256)
    assert L.special("<|bos|>") == 400 and L.visual_offset == 400 + len(SPECIAL_TOKENS)
    assert L.size == 400 + len(SPECIAL_TOKENS) + 256
    assert Vocabulary.from_dict(json.loads(json.dumps(L.to_dict()))) == L


def test_token_shards_follow_the_emu3_layout(world):
    manifest = read_json(world / "tokens" / "manifest.json")
    L = Vocabulary.from_dict(manifest["layout"])
    assert manifest["documents"] == 160 and manifest["skipped"] == {}
    assert manifest["tokens"]["total"] == sum(manifest["tokens"][k] for k in ("text", "image", "video")) + 2 * 160
    from data_pipeline.text_tokenizer import TextTokenizer
    text = TextTokenizer(world / "tok" / "text_tokenizer.model")
    seen = set()
    for shard in manifest["shards"]:
        for sample in iter_samples(world / "tokens" / shard):
            tokens = npy_load(sample["tokens.npy"])
            assert tokens.dtype == np.uint32 and tokens[0] == L.bos and tokens[-1] == L.eos
            for start, end, kind in json.loads(sample["spans.json"]):
                span = tokens[start:end].tolist()
                seen.add(kind)
                if kind == "image":
                    assert_image_grid(span, L, text, 4, 4)  # 32x32 pixels, 8x downsampling
                if kind == "video":
                    assert span[0] == L.special("<|video start|>") and span[-1] == L.special("<|video end|>")
                    assert span.count(L.special("<|eof|>")) == 2  # 8 frames -> 2 latent frames
                if kind == "text":
                    assert max(span) < L.text_size
    assert seen == {"text", "image", "video"}


def test_fingerprint_depends_on_tokenizers(world, tmp_path):
    L = Vocabulary(400, 256)
    base = fingerprint(L, world / "tok" / "text_tokenizer.model", world / "tok" / "vq")
    assert read_json(world / "tokens" / "manifest.json")["fingerprint"] == base
    assert fingerprint(Vocabulary(400, 512), world / "tok" / "text_tokenizer.model", world / "tok" / "vq") != base
    other = tmp_path / "sp.model"
    other.write_bytes((world / "tok" / "text_tokenizer.model").read_bytes() + b"x")
    assert fingerprint(L, other, world / "tok" / "vq") != base


def test_bad_samples_are_skipped_counted_and_reruns_skip_done_shards(world, tmp_path):
    raw = tmp_path / "raw"
    image_doc = next(d for d in map(lambda i: make_document(i, 0), range(50)) if "img0.png" in d)
    with ShardWriter(raw, "a", max_count=None) as w:
        w.write(make_document(0, 0))
        w.write({**image_doc, "__key__": "corrupt", "img0.png": b"garbage"})
        w.write({"__key__": "nojson", "txt": b"hello"})
    shutil.copy(raw / "a.tar", raw / "b.tar")
    (raw / "c.tar").write_bytes(b"not a tar")
    args = (world / "tok" / "text_tokenizer.model", world / "tok" / "vq", 32, 8)
    m = tokenize([raw], tmp_path / "tokens", *args, log=lambda m: None)
    assert m["documents"] == 2
    assert sum(m["skipped"].values()) == 2 * 2 + 1 and m["skipped"]["unreadable_shard"] == 1
    assert m["skipped"]["missing_json"] == 2 and m["skipped"]["bad_image"] == 2
    before = (tmp_path / "tokens" / "tokens-a.tar").stat().st_mtime_ns
    logs = []
    tokenize([raw], tmp_path / "tokens", *args, log=logs.append)
    assert (tmp_path / "tokens" / "tokens-a.tar").stat().st_mtime_ns == before
    assert sum("already done" in line for line in logs) == 3


def test_tokenize_refuses_a_directory_of_another_vocabulary(world, tmp_path):
    out = copy_with_fingerprint(world / "tokens", tmp_path / "tokens", "vocab.json", "0" * 16)
    with pytest.raises(ValueError, match="another vocabulary"):
        tokenize([world / "raw"], out, world / "tok" / "text_tokenizer.model", world / "tok" / "vq", 32, 8)
