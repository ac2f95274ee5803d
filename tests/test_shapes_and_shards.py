import json
import random
from collections import Counter

import numpy as np
import pytest

from conftest import run_loom
from data_pipeline.media import MediaError, decode_image, decode_video, encode_mp4
from data_pipeline.raw import SampleError, SkipCounter, parse_document
from data_pipeline.sources import iter_documents
from data_pipeline.shapes import (BACKGROUND, COLORS, WorldSpec, glyph_cells, make_document, render, scene_shapes,
                                   write_world)
from data_pipeline.shards import ShardError, ShardWriter, iter_samples, list_shards


def test_world_is_deterministic_for_a_seed():
    for i in range(20):
        a, b = make_document(i, seed=3), make_document(i, seed=3)
        assert a == b
    assert any(make_document(i, 3)["json"] != make_document(i, 4)["json"] for i in range(5))


def test_documents_of_every_kind_carry_their_truth(tmp_path):
    summary = write_world(tmp_path, 80, seed=0, docs_per_shard=30)
    assert summary["shards"] == 3 and sum(summary["by_kind"].values()) == 80
    assert all(summary["by_kind"][k] > 0 for k in ("image", "video", "interleaved", "text"))
    skipped = SkipCounter()
    docs = list(iter_documents([tmp_path], skipped))
    assert len(docs) == 80 and skipped.total == 0
    for (where, segments), i in zip(docs, range(80)):
        truth = json.loads(make_document(i, 0)["json"])["truth"]
        kinds = [s.kind for s in segments]
        if truth["kind"] == "image":
            assert kinds == ["text", "image"] and truth["objects"] and truth["caption"] in segments[0].text.lower()
        if truth["kind"] == "video":
            assert kinds == ["text", "video"] and truth["direction"] in segments[0].text
            frames = decode_video(segments[1].data, 8)
            assert frames.shape == (8, 32, 32, 3)


def test_rendered_colors_are_where_the_truth_says():
    objects = [{"shape": "square", "color": "red", "cx": 0.27, "cy": 0.5, "r": 0.16}]
    img = render(objects, 32)
    assert tuple(img[16, 8]) == COLORS["red"] and tuple(img[16, 28]) != COLORS["red"]


def test_glyph_world_draws_glyphs_at_zipfian_rates_and_renders_their_cells():
    """The scaling-law world (docs/sweeps.md): the k-th glyph at rate ~ k^-s, each drawn as its 4x4 cells."""
    spec = WorldSpec(image_size=64, glyphs=64, glyph_zipf=1.2)
    rng = random.Random(0)
    counts = Counter(scene_shapes(rng, spec, 1)[0] for _ in range(20000))
    assert set(counts) <= {f"glyph-{k}" for k in range(64)}
    ratio = counts["glyph-0"] / counts["glyph-7"]  # expected 8^1.2 = 12.1; the rarer count has ~5% noise
    assert abs(ratio / 8 ** 1.2 - 1) < 0.15, ratio
    assert len(set(scene_shapes(rng, spec, 2))) == 2

    cells = glyph_cells("glyph-5")
    img = render([{"shape": "glyph-5", "color": "blue", "cx": 0.5, "cy": 0.5, "r": 0.25}], 64)
    for i in range(4):
        for j in range(4):  # the box is 32 px from (16, 16): each cell is 8 px, sampled at its middle
            expected = COLORS["blue"] if (i, j) in cells else BACKGROUND
            assert tuple(img[16 + 8 * i + 4, 16 + 8 * j + 4]) == expected, (i, j)
    truth = json.loads(make_document(0, 5, WorldSpec(mix=(1, 0, 0, 0), glyphs=64))["json"])["truth"]
    assert all(o["shape"].startswith("glyph-") for o in truth["objects"]) and "glyph-" in truth["caption"]


def test_synth_writes_the_glyph_world_and_refuses_a_bad_exponent(tmp_path):
    for flags in (["--glyph-zipf", "0"], ["--glyphs", "1"]):
        bad = run_loom("data", "synth", "--out", tmp_path / "bad", *flags)
        assert bad.returncode != 0 and flags[0] in bad.stderr and not (tmp_path / "bad").exists()
    ok = run_loom("data", "synth", "--out", tmp_path / "w", "--docs", "40", "--mix", "image=1", "--glyphs", "16")
    assert ok.returncode == 0, ok.stderr
    world = json.loads((tmp_path / "w" / "world.json").read_text())
    assert world["glyphs"] == 16 and world["glyph_zipf"] == 1.2 and world["by_kind"]["image"] == 40


def test_video_roundtrip_through_mp4():
    frames = np.zeros((8, 32, 32, 3), np.uint8)
    frames[:, :, :16] = (200, 30, 30)
    out = decode_video(encode_mp4(frames), 4)
    assert out.shape == (4, 32, 32, 3)
    assert abs(int(out[0, 16, 4, 0]) - 200) < 30


def test_image_modes_are_converted(tmp_path):
    import io

    from PIL import Image
    for mode in ("L", "P", "RGBA", "CMYK"):
        buf = io.BytesIO()
        Image.new(mode, (10, 6)).save(buf, format="PNG" if mode != "CMYK" else "JPEG")
        assert decode_image(buf.getvalue()).shape == (6, 10, 3)
    with pytest.raises(MediaError):
        decode_image(b"not an image")
    with pytest.raises(MediaError):
        decode_video(b"not a video", 4)


def test_shard_writer_is_atomic(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "x", max_count=2) as w:
            for i in range(3):
                w.write({"__key__": f"{i:03d}", "txt": "hello"})
            raise RuntimeError("boom")
    # the first, completed shard is kept; the one in progress is gone, no .tmp left behind
    assert [p.name for p in tmp_path.iterdir()] == ["x-00000.tar"]


def test_reader_names_the_broken_shard_and_keeps_earlier_samples(tmp_path):
    with ShardWriter(tmp_path, "x", max_count=None) as w:
        for i in range(50):
            w.write({"__key__": f"{i:03d}", "bin": bytes(2000)})
    data = (tmp_path / "x.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(ShardError, match="cut.tar: truncated or corrupt"):
        for s in iter_samples(cut):
            got.append(s["__key__"])
    assert len(got) > 10
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ShardError, match="junk.tar"):
        list(iter_samples(junk))
    with pytest.raises(ShardError, match="data directory not found"):
        list_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no .tar shards"):
        list_shards(tmp_path / "empty")


def test_tar_codec_agrees_with_tarfile_and_webdataset(tmp_path):
    """Shards Loom writes read with tarfile and webdataset; shards of GNU tar / pax (long names) read with Loom."""
    import io
    import tarfile

    import webdataset as wds

    with ShardWriter(tmp_path, "loom", max_count=None) as w:
        for i in range(3):
            w.write({"__key__": f"{i:03d}", "txt": f"text {i}", "json": {"i": i}, "bin": bytes(range(i * 100 % 256))})
    with tarfile.open(tmp_path / "loom.tar") as tar:
        assert tar.getnames()[:3] == ["000.bin", "000.json", "000.txt"]
        assert tar.extractfile("001.txt").read() == b"text 1"
    got = list(wds.WebDataset(str(tmp_path / "loom.tar"), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in got] == ["000", "001", "002"] and got[2]["json"] == b'{"i": 2}'
    long_key = "k" * 120
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"other-{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            directory = tarfile.TarInfo("shard")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
            for key in ("a", long_key if fmt != tarfile.USTAR_FORMAT else "b"):
                for ext, data in (("jpg", b"\xff" * 700), ("txt", "caption é".encode())):
                    info = tarfile.TarInfo(f"shard/{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        samples = list(iter_samples(path))
        assert [s["__key__"] for s in samples][0] == "a" and len(samples) == 2
        assert all(s["jpg"] == b"\xff" * 700 and s["txt"] == "caption é".encode() for s in samples)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    with ShardWriter(tmp_path, "raw", max_count=None) as w:
        w.write(make_document(0, 0))
        w.write({"__key__": "nojson", "txt": b"x"})
        w.write({"__key__": "badjson", "json": b"{not json"})
        w.write({"__key__": "missing", "json": json.dumps({"segments": [{"image": "img0.png"}]}).encode()})
        w.write({"__key__": "twokinds", "json": json.dumps({"segments": [{"text": "a", "image": "b"}]}).encode()})
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all")
    skipped = SkipCounter()
    docs = list(iter_documents([tmp_path], skipped))
    assert len(docs) == 1
    assert skipped.by_reason == {"missing_json": 1, "bad_json": 1, "missing_image": 1, "bad_segment": 1,
                                 "unreadable_shard": 1}
    assert "raw.tar:missing" in skipped.examples["missing_image"]
    with pytest.raises(SampleError, match="segments"):
        parse_document({"__key__": "k", "json": b"{}"})
