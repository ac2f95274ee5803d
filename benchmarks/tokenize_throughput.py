"""Tokenize throughput: the job end to end against the bare visual encoder, in one run.

    python benchmarks/tokenize_throughput.py [--images 1536] [--image-size 64] [--workers 0 1]

Input: img2dataset-style shards (JPEG + .txt caption + .json) of pictures 1.5 x 1.25 times the output
size (96x80 for 64x64 crops). The visual tokenizer has the quickstart recipe's architecture
(untrained: speed does not depend on the weights). Baseline: the bare encoder on the same images,
decoded beforehand, in batches of 32. Then `run_tokenize` (the job `loom data tokenize` runs: read,
decode, resize, encode, text tokenize, write shards) on one rank with N loader workers. The two
alternate (`--pairs` times; this machine's speed drifts between runs) and each pair gives a ratio;
prints images/s, the median job / bare ratio (goal >= 0.9) and the share of the job's time the
encoder is busy.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.media import Geometry, decode_image  # noqa: E402
from data_pipeline.shards import ShardWriter, iter_samples  # noqa: E402
from data_pipeline.text_tokenizer import train_text_tokenizer  # noqa: E402
from data_pipeline.tokenize_config import TokenizeConfig, TokenizeSource  # noqa: E402
from data_pipeline.tokenize_job import run_tokenize  # noqa: E402
from data_pipeline.vq_config import load_vq_config  # noqa: E402
from data_pipeline.vq_train import build_tokenizer  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "visual_tokenizer" / "quickstart.yaml"
WORDS = "red green blue yellow square circle triangle small large left right top bottom moving".split()


def write_shards(directory: Path, images: int, per_shard: int, rng, scale: int = 8) -> None:
    """JPEG pictures of 12 x 10 color blocks of `scale` pixels, with captions and img2dataset's json."""
    for s in range(0, images, per_shard):
        with ShardWriter(directory, f"{s // per_shard:05d}", max_count=None) as w:
            for i in range(s, min(s + per_shard, images)):
                pixels = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8).repeat(scale, 0).repeat(scale, 1)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                caption = " ".join(rng.choice(WORDS, rng.integers(4, 12)))
                w.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": caption,
                         "json": json.dumps({"caption": caption, "width": 12 * scale, "height": 10 * scale})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pairs", type=int, default=3, help="alternating bare/job runs (this machine's speed drifts)")
    args = parser.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_shards(work / "in", args.images, args.per_shard, np.random.default_rng(0), args.image_size // 8)
        with ShardWriter(work / "captions", "captions", max_count=None) as w:
            for i in range(len(WORDS)):
                w.write({"__key__": f"{i:03d}", "json": {"segments": [{"text": " ".join(WORDS[i:] + WORDS[:i])}]}})
        train_text_tokenizer([work / "captions"], work, vocab_size=320)
        cfg = load_vq_config(RECIPE, [f"data.raw=[{work}]", f"data.geometry.size={args.image_size}"])
        tok = build_tokenizer(cfg).eval()
        tok.save_pretrained(work / "vq")
        geometry = Geometry(size=args.image_size)
        arrays = [decode_image(sample["jpg"], geometry) for shard in sorted((work / "in").glob("*.tar"))
                  for sample in iter_samples(shard)]
        print(f"tokenize {len(arrays)} JPEG image-caption pairs (img2dataset shards of {args.per_shard}) "
              f"to {args.image_size}x{args.image_size}, {torch.get_num_threads()} threads; {args.pairs} alternating "
              f"runs of the bare encoder and the job, ratio of each pair:")
        for n in args.workers:
            runs = [(bare_encoder(tok, arrays), *tokenize_job(work, n, geometry, repeat))
                    for repeat in range(args.pairs)]
            ratios = sorted(job / bare for bare, job, _ in runs)
            bare, job, busy = runs[-1]
            print(f"  {n} loader worker(s): bare encoder {bare:6.1f} images/s, job {job:6.1f} images/s, encoder busy "
                  f"{busy:.0%} (last pair); job / bare median {ratios[len(ratios) // 2]:.2f}x "
                  f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)}; goal >= 0.9)")
    print(f"tokenize benchmark: done in {time.time() - start:.0f}s")


def bare_encoder(tok, arrays) -> float:
    with torch.inference_mode():
        tok.encode_images(np.stack(arrays[:32]))
        t = time.perf_counter()
        for i in range(0, len(arrays), 32):
            tok.encode_images(np.stack(arrays[i:i + 32]))
        return len(arrays) / (time.perf_counter() - t)


def tokenize_job(work: Path, n: int, geometry: Geometry, repeat: int) -> tuple[float, float]:
    """(images/s, share of the time the encoder is busy) of one run of the job, end to end."""
    out = work / f"out{n}-{repeat}"
    job = TokenizeConfig(out_dir=str(out), text_tokenizer=str(work / "text_tokenizer.model"),
                         visual_tokenizer=str(work / "vq"), geometry=geometry, workers=n,
                         sources=[TokenizeSource(name="pairs", format="image_text", paths=[str(work / "in")])])
    t = time.perf_counter()
    m = run_tokenize(job, log=lambda m: None)
    rate = m["documents"] / (time.perf_counter() - t)
    stats = [json.loads(p.read_text()) for p in sorted((out / "pairs").glob("tokens-*.json"))]
    return rate, sum(s["encoder_seconds"] for s in stats) / sum(s["seconds"] for s in stats)


if __name__ == "__main__":
    main()
