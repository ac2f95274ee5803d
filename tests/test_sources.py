"""Readers of the users' formats, bad input, and the tokenize job across ranks (issue: real data at scale).

Every input here is generated in the format its producer writes: img2dataset webdataset shards,
WebVid-style video shards, OBELICS-style jsonl and parquet, plain text.
"""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO, run_loom
from data_pipeline.media import encode_mp4
from data_pipeline.loader import Source
from data_pipeline.shards import ShardError, ShardWriter, iter_samples, npy_load, read_json
from data_pipeline.text_tokenizer import TextTokenizer
from data_pipeline.tokenize_config import load_tokenize_config
from data_pipeline.tokenize_job import run_tokenize
from data_pipeline.vocab import Vocabulary

QUIET = lambda m: None  # noqa: E731
COLORS = [(220, 30, 30), (30, 160, 40), (40, 60, 220), (240, 200, 20)]


def picture(i: int, size=(48, 40), fmt="PNG") -> bytes:
    img = Image.new("RGB", size, COLORS[i % 4])
    img.paste(COLORS[(i + 1) % 4], (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def clip(i: int, container="mp4", codec="mpeg4", frames=8) -> bytes:
    if container == "mp4" and codec == "mpeg4":
        return encode_mp4(np.stack([np.full((32, 32, 3), COLORS[(i + t) % 4], np.uint8) for t in range(frames)]))
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), COLORS[(i + t) % 4], np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def img2dataset_shard(directory, name, samples):
    """`samples`: dicts of members; keys numbered as img2dataset does."""
    with ShardWriter(directory, name, max_count=None) as w:
        for i, members in enumerate(samples):
            w.write({"__key__": f"{name}{i:04d}", **members})


def image_text_pair(i):
    caption = f"a {['red', 'green', 'blue', 'yellow'][i % 4]} picture number {i}"
    fmt = ["jpg", "png", "webp"][i % 3]
    meta = {"caption": caption, "url": f"http://example.com/{i}.{fmt}", "status": "success", "width": 48, "height": 40}
    members = {fmt: picture(i, fmt={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]), "json": json.dumps(meta)}
    if i % 2:
        members["txt"] = caption  # img2dataset writes both; some pipelines only the json
    return members


def write_inputs(root, shards=2, per_shard=6):
    """One small input of every format; returns the tokenize config's sources."""
    for s in range(shards):
        img2dataset_shard(root / "laion", f"{s:05d}", [image_text_pair(s * per_shard + i) for i in range(per_shard)])
    videos = [{"mp4": clip(0), "txt": "a clip in mp4"}, {"webm": clip(1, "webm", "libvpx"), "txt": "a clip in webm"},
              {"mkv": clip(2, "matroska", "mpeg4"), "json": json.dumps({"caption": "a clip in mkv"})}]
    img2dataset_shard(root / "webvid", "00000", videos)
    (root / "obelics" / "images").mkdir(parents=True)
    (root / "obelics" / "images" / "a.png").write_bytes(picture(0))
    rows = [{"texts": ["An article.", None, "It goes on."], "images": [None, "images/a.png", None]},
            {"texts": [None, "A caption under it."], "images": [base64.b64encode(picture(1)).decode(), None]}]
    (root / "obelics" / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"texts": [["Parquet text first.", None], [None, "then an image first"]],
                      "images": [[None, {"bytes": picture(2), "path": "x.png"}], [{"bytes": picture(3), "path": None},
                                                                                   None]]})
    pq.write_table(table, root / "obelics" / "part-1.parquet")
    (root / "mmc4").mkdir()
    (root / "mmc4" / "docs.jsonl").write_text(json.dumps({
        "url": "http://example.com/page", "text_list": ["First sentence.", "Second sentence."],
        "image_info": [{"image_name": "a.png", "matched_text_index": 1, "matched_sim": 0.3}]}) + "\n")
    (root / "mmc4" / "a.png").write_bytes(picture(1))
    (root / "text").mkdir()
    (root / "text" / "web.jsonl").write_text(json.dumps({"text": "one web page"}) + "\n" +
                                             json.dumps({"text": "another page", "url": "u"}) + "\n")
    (root / "text" / "book.txt").write_text("First paragraph\nstill first.\n\nSecond paragraph.\n\n\nThird.\n")
    return [{"name": "laion", "format": "image_text", "paths": [str(root / "laion")]},
            {"name": "webvid", "format": "video_text", "paths": [str(root / "webvid" / "*.tar")]},
            {"name": "obelics", "format": "interleaved", "paths": [str(root / "obelics")]},
            {"name": "mmc4", "format": "interleaved", "layout": "mmc4", "paths": [str(root / "mmc4")]},
            {"name": "text", "format": "text",
             "paths": [str(root / "text" / "web.jsonl"), str(root / "text" / "book.txt")]}]


def write_config(path, world, out, sources, **extra):
    cfg = {"out_dir": str(out), "text_tokenizer": str(world / "tok" / "text_tokenizer.model"),
           "visual_tokenizer": str(world / "tok" / "vq"), "sources": sources, "geometry": {"size": 32},
           "video_frames": 8, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def documents(directory):
    """{shard/key: (tokens, spans)} of every token shard in a source directory."""
    out = {}
    for shard in read_json(directory / "manifest.json")["shards"]:
        for sample in iter_samples(directory / shard):
            out[f"{shard}/{sample['__key__']}"] = (npy_load(sample["tokens.npy"]), json.loads(sample["spans.json"]))
    return out


def test_every_reader_on_its_format(world, tmp_path):
    sources = write_inputs(tmp_path / "in")
    sources[0]["image_first_fraction"] = 0.5
    cfg = load_tokenize_config(write_config(tmp_path / "tok.yaml", world, tmp_path / "out", sources))
    m = run_tokenize(cfg, log=QUIET)
    assert m["skipped"] == {} and m["failed_shards"] == {}
    assert {k: v["documents"] for k, v in m["sources"].items()} == {"laion": 12, "webvid": 3, "obelics": 4, "mmc4": 1,
                                                                     "text": 5}
    assert m["documents"] == 25 and set(m["tokens"]) == {"text", "image", "video", "total"}
    text = TextTokenizer(world / "tok" / "text_tokenizer.model")
    layout = Vocabulary.from_dict(m["layout"])

    def segments(tokens, spans):
        return [(kind, text.decode(tokens[a:b].tolist()) if kind == "text" else None) for a, b, kind in spans]

    laion = documents(tmp_path / "out" / "laion")
    orders = {tuple(k for k, _ in segments(*doc)) for doc in laion.values()}
    assert orders == {("text", "image"), ("image", "text")}  # both layouts at fraction 0.5
    first = segments(*laion["tokens-00000.tar/000000000"])
    assert ("text", "a red picture number 0") in first  # caption from the json member
    for tokens, spans in laion.values():
        image = next(tokens[a:b] for a, b, kind in spans if kind == "image")
        assert image[0] == layout.special("<|image start|>") and (image >= layout.visual_offset).sum() == 16
    webvid = documents(tmp_path / "out" / "webvid")
    assert sorted(segments(*d)[0][1] for d in webvid.values()) == ["a clip in mkv", "a clip in mp4", "a clip in webm"]
    obelics = {k: segments(*d) for k, d in documents(tmp_path / "out" / "obelics").items()}
    assert sorted(obelics.values()) == sorted([
        [("text", "An article."), ("image", None), ("text", "It goes on.")],
        [("image", None), ("text", "A caption under it.")],
        [("text", "Parquet text first."), ("image", None)], [("image", None), ("text", "then an image first")]])
    mmc4 = [segments(*d) for d in documents(tmp_path / "out" / "mmc4").values()]
    assert mmc4 == [[("text", "First sentence."), ("image", None), ("text", "Second sentence.")]]
    texts = sorted(segments(*d)[0][1] for d in documents(tmp_path / "out" / "text").values())
    assert texts == sorted(["one web page", "another page", "First paragraph\nstill first.", "Second paragraph.",
                            "Third."])
    assert read_json(tmp_path / "out" / "laion" / "manifest.json")["fingerprint"] == m["fingerprint"]
    with pytest.raises(ShardError, match=r"summary of several sources; point data.sources.mix.path at one source's "
                                         r"folder: .*out/laion, .*out/mmc4"):
        Source.open("mix", tmp_path / "out", 1.0)  # the job's merged manifest is not a source
    assert Source.open("laion", tmp_path / "out" / "laion", 1.0).shards
    result = run_loom("data", "text-tokenizer", "--sources", tmp_path / "tok.yaml", "--out", tmp_path / "sp",
                      "--vocab-size", "320")
    assert result.returncode == 0 and "from 27 text segments" in result.stdout, result.stderr[-2000:]


def test_visual_tokenizer_trains_on_img2dataset_and_video_shards(tmp_path):
    from data_pipeline.vq_config import load_vq_config
    from data_pipeline.vq_train import train_vq

    write_inputs(tmp_path / "in")
    sources = (f"[{{name: laion, format: image_text, paths: [{tmp_path / 'in' / 'laion'}]}}, "
               f"{{name: webvid, format: video_text, paths: [{tmp_path / 'in' / 'webvid'}]}}]")
    cfg = load_vq_config(None, [f"out_dir={tmp_path / 'vq'}", f"data.sources={sources}", "model.codebook_size=64",
                                "optim.steps=2", "optim.batch_size=4", "data.eval_clips=2",
                                "logging.tensorboard=false"])
    summary = train_vq(cfg, log=QUIET)
    assert summary["steps"] == 2 and summary["clips"] == 12 + 3 - 2 and summary["skipped"]["total"] == 0


def zero_frame_video() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()  # the header with a video stream, then no frame at all
    return buf.getvalue()


def test_bad_input_is_skipped_counted_by_reason_and_nothing_written_is_lost(world, tmp_path):
    good = [image_text_pair(i) for i in range(4)]
    img2dataset_shard(tmp_path / "laion", "00000", [
        good[0], {"jpg": picture(5, fmt="JPEG")},                       # missing caption
        {"png": b"\x89PNG not really", "txt": "corrupt bytes"},        # corrupt image
        good[1], {"png": picture(6), "txt": b"caf\xe9 in latin-1"},    # invalid UTF-8 caption
        {"png": picture(7, size=(30000, 10)), "txt": "a very wide image"},
        image_text_pair(50), {**good[0]},                               # an exact duplicate of the first
        {"png": picture(8), "txt": "x" * 500}, image_text_pair(51)])   # a caption over max_caption_chars
    img2dataset_shard(tmp_path / "laion", "00001", good[2:] + [image_text_pair(i) for i in range(10, 40)])
    whole = (tmp_path / "laion" / "00001.tar").read_bytes()
    (tmp_path / "laion" / "00001.tar").write_bytes(whole[:len(whole) * 2 // 3])   # truncated tar
    (tmp_path / "laion" / "00002.tar").write_bytes(b"this is not a tar file at all" * 100)
    broken = [{"jpg": b"broken %d" % i, "txt": "broken"} for i in range(3)]
    img2dataset_shard(tmp_path / "laion", "00003", broken + [image_text_pair(60)])
    img2dataset_shard(tmp_path / "webvid", "00000", [{"mp4": zero_frame_video(), "txt": "no frames"},
                                                     {"mp4": clip(0), "txt": "a fine clip"}])
    (tmp_path / "obelics").mkdir()
    (tmp_path / "obelics" / "rows.jsonl").write_bytes(
        b'{"texts": ["a", null], "images": [null]}\n{"texts": ["fine text"], "images": [null]}\n')
    sources = [{"name": "laion", "format": "image_text", "paths": [str(tmp_path / "laion")],
                "filters": {"dedup": True, "max_caption_chars": 200}},
               {"name": "webvid", "format": "video_text", "paths": [str(tmp_path / "webvid")]},
               {"name": "obelics", "format": "interleaved", "paths": [str(tmp_path / "obelics")]}]
    cfg = load_tokenize_config(write_config(tmp_path / "tok.yaml", world, tmp_path / "out", sources,
                                            max_consecutive_failures=3))
    m = run_tokenize(cfg, log=QUIET)
    assert m["skipped"] == {"missing_caption": 1, "bad_image": 4, "bad_text": 1, "image_aspect_ratio": 1,
                            "duplicate": 1, "caption_too_long": 1, "unreadable_shard": 2,
                            "video_no_frames": 1, "mismatched_lists": 1}, m["skipped"]
    laion = m["sources"]["laion"]
    kept = read_json(tmp_path / "out" / "laion" / "tokens-00001.json")
    assert 2 <= kept["documents"] < 32 and "truncated" in kept["failed"]   # samples before the cut are kept
    assert set(m["failed_shards"]) == {"laion/00001.tar", "laion/00002.tar", "laion/00003.tar"}
    assert "3 failed samples in a row" in m["failed_shards"]["laion/00003.tar"]
    assert read_json(tmp_path / "out" / "laion" / "tokens-00003.json")["documents"] == 0  # stopped before good[3]
    assert laion["documents"] == 4 + kept["documents"]
    assert m["sources"]["webvid"]["documents"] == 1 and m["sources"]["obelics"]["documents"] == 1


def test_background_decoding_delivers_in_order_and_stops_when_closed():
    import threading

    from data_pipeline.tokenize import in_background

    assert list(in_background(iter(range(500)), 4)) == list(range(500))
    produced = []
    items = in_background((produced.append(i) or i for i in range(10**9)), 4)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    time.sleep(0.5)
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count < 20 and threading.active_count() < 50  # the thread stopped

    def failing():
        yield 1
        raise OSError("disk gone")
    with pytest.raises(OSError, match="disk gone"):
        list(in_background(failing(), 4))


def test_tokenize_config_errors_name_the_field(world, tmp_path):
    from common.config import ConfigError

    base = write_config(tmp_path / "tok.yaml", world, tmp_path / "out", [{"name": "a", "format": "image_text",
                                                                          "paths": ["x"]}])
    for override, message in (("video_frames=6", "multiple of 4"),
                              ("visual_tokenizer=/nope", "visual_tokenizer: directory not found"),
                              ("geometry.size=30", "multiple of 8")):
        with pytest.raises(ConfigError, match=message):
            load_tokenize_config(base, [override])
    bad_format = write_config(tmp_path / "bad.yaml", world, tmp_path / "out", [{"name": "a", "format": "laion",
                                                                                "paths": ["x"]}])
    with pytest.raises(ConfigError, match=r"sources\[0\] \(a\)\.format='laion': use one of loom, image_text"):
        load_tokenize_config(bad_format)
    result = run_loom("data", "tokenize", base)
    assert result.returncode != 0 and "source 'a': x not found" in result.stderr


@pytest.mark.slow
def test_three_ranks_and_a_killed_run_write_the_same_shards_as_one_process(world, tmp_path):
    sources = write_inputs(tmp_path / "in", shards=10, per_shard=24)
    sources[0]["filters"] = {"dedup": True}  # hash files cross ranks
    config = write_config(tmp_path / "tok.yaml", world, tmp_path / "one", sources)
    reference = run_tokenize(load_tokenize_config(config), log=QUIET)

    def shards(out):
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/tokens-*.tar"))}

    expected = shards(tmp_path / "one")
    assert len(expected) == 10 + 1 + 2 + 1 + 2
    result = run_loom("data", "tokenize", config, f"out_dir={tmp_path / 'three'}", "nproc_per_node=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[rank 2/3]" in result.stderr + result.stdout and "all ranks" in result.stderr + result.stdout
    assert shards(tmp_path / "three") == expected
    merged = read_json(tmp_path / "three" / "manifest.json")
    assert {k: merged[k] for k in ("documents", "tokens", "skipped")} == \
        {k: reference[k] for k in ("documents", "tokens", "skipped")}

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "launch.cli", "data", "tokenize", str(config), f"out_dir={out}", "threads=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list(out.glob("laion/tokens-*.json")) and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*/tokens-*.json")))
    assert 0 < done < len(expected), done
    result = run_loom("data", "tokenize", config, f"out_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("already done") + result.stderr.count("already done") == done
    assert shards(out) == expected


@pytest.mark.parametrize("world", [1, 3])
def test_partitioned_dedup_drops_every_later_copy_whatever_the_ranks(world, tmp_path):
    """5 hash files of 40 documents drawing from 60 contents: each rank holds a third of the hashes, and together
    they drop exactly the documents whose content appeared at an earlier position in input order."""
    from data_pipeline.dedup import duplicate_keys, partition_path, write_partition

    rng = np.random.default_rng(world)
    files, contents = [], []
    for i in range(5):
        hashes = rng.integers(0, 60, 40).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        keys = [f"f{i}-{k:02d}" for k in range(40)]
        files.append(tmp_path / "hashes" / f"f{i}.npz")
        files[-1].parent.mkdir(exist_ok=True)
        np.savez(files[-1], keys=np.array(keys, dtype=str), hashes=hashes)
        contents += list(zip(keys, hashes.tolist()))
    seen, expected = set(), set()
    for key, h in contents:
        (expected.add(key) if h in seen else seen.add(h))
    for rank in range(world):
        write_partition(files, rank, world)
    partitions = [partition_path(files, r, world) for r in range(world)]
    assert sum(len(np.load(p)) for p in partitions) == len(expected)
    dropped = set()
    for rank in range(world):  # each rank asks for its own input files only
        for keys in duplicate_keys(files, files[rank::world], partitions).values():
            dropped |= keys
    assert dropped == expected
