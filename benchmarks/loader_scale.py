"""Loader start-up and memory against the number of shards and documents: the production-size question.

    python benchmarks/loader_scale.py [--shards 1000 10000 100000] [--docs-per-shard 10] [--legacy-max 100000]

For each size, token shards of small documents (20-60 text tokens) are written to a temporary directory as
the tokenize job writes them (a shard index beside each shard, per-shard counts in the manifest). Then, in a
fresh process per case, one data-parallel rank of 8 (global batch 64, rows of 1024 tokens) opens the source and
takes its first global batch: start-up seconds and the resident memory it added, then tokens/s over 3 s.
Cases: 'indexed' (Loom's loader: the manifest's counts, a shard's index memory-mapped on first use) and, up to
--legacy-max documents, 'tar-headers' (the loader before indexes: every shard's tar headers read at start, a
Python dict per document; the same code path a folder without counts takes). Prints the growth per shard and
per document between the two largest sizes and extrapolates to 10^5 shards and 10^9 documents.
Goal (issue 19): start-up <= 5 s and <= 1 GiB per rank at the largest size, flat in documents.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.shards import ShardWriter, npy_bytes, write_json_atomic  # noqa: E402
from data_pipeline.token_index import build_index, save_index  # noqa: E402
from data_pipeline.vocab import Vocabulary  # noqa: E402

LAYOUT = Vocabulary(512, 512)
RANKS, GLOBAL_BATCH, SEQ = 8, 64, 1024


def write_source(path: Path, shards: int, per_shard: int, log) -> None:
    rng = np.random.default_rng(0)
    names, sizes = [], []
    started = time.perf_counter()
    for s in range(shards):
        with ShardWriter(path, f"tokens-{s:06d}", max_count=None) as w:
            for d in range(per_shard):
                tokens = np.concatenate([[LAYOUT.bos], rng.integers(0, 512, rng.integers(20, 61)), [LAYOUT.eos]])
                w.write({"__key__": f"{s:06d}{d:04d}", "tokens.npy": npy_bytes(tokens.astype(np.uint32)),
                         "spans.json": json.dumps([[1, len(tokens) - 1, "text"]]).encode()})
        shard = path / f"tokens-{s:06d}.tar"
        save_index(shard, build_index(shard)[0])
        names.append(shard.name)
        sizes.append(shard.stat().st_size)
        if (s + 1) % 10000 == 0:
            log(f"  wrote {s + 1}/{shards} shards ({time.perf_counter() - started:.0f} s)")
    write_json_atomic(path / "manifest.json", {
        "shards": names, "shard_documents": [per_shard] * shards, "shard_bytes": sizes, "fingerprint": "bench",
        "layout": LAYOUT.to_dict(), "documents": shards * per_shard})


def rss_bytes() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure(folder: str, mode: str) -> dict:
    """One rank's start-up in this (fresh) process: Source.open, TokenLoader, first global batch."""
    import io
    from contextlib import redirect_stderr

    from data_pipeline.loader import Source, TokenLoader

    if mode == "tar-headers":  # as a folder without per-shard counts or indexes is read
        for index in Path(folder).glob("*.idx.npy"):
            index.rename(index.with_name(index.name + ".hidden"))
    before, started = rss_bytes(), time.perf_counter()
    with redirect_stderr(io.StringIO()):
        source = Source.open("bench", folder, 1.0)
        if mode == "tar-headers":
            source.shard_documents = source.shard_bytes = None
        loader = TokenLoader([source], LAYOUT, seq_len=SEQ, global_batch_size=GLOBAL_BATCH,
                             micro_batch_size=GLOBAL_BATCH // RANKS, dp_rank=3, dp_size=RANKS, seed=0)
        loader.next_step()
    startup = time.perf_counter() - started
    added = rss_bytes() - before
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < 3:
        loader.next_step()
        steps += 1
    if mode == "tar-headers":
        for index in Path(folder).glob("*.idx.npy.hidden"):
            index.rename(index.with_name(index.name.removesuffix(".hidden")))
    return {"startup_s": startup, "rss_added_mib": added / 2 ** 20,
            "tokens_per_s": steps * GLOBAL_BATCH // RANKS * SEQ / (time.perf_counter() - started)}


def in_child(folder: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", str(folder), mode], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def growth(rows: list[dict], key: str, by: str) -> float:
    """The slope of `key` in `by` between the first and the last of `rows`."""
    a, b = rows[0], rows[-1]
    return (b[key] - a[key]) / (b[by] - a[by])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1000x10", "10000x10", "100000x10", "1000x1000"],
                        help="SHARDSxDOCUMENTS_PER_SHARD; the last one here holds the shards and adds documents")
    parser.add_argument("--legacy-max", type=int, default=100000, help="documents up to which 'tar-headers' runs")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            shards, per_shard = (int(x) for x in size.split("x"))
            folder, docs = Path(tmp) / size, shards * per_shard
            print(f"{shards} shards, {docs} documents: writing ...", flush=True)
            write_source(folder, shards, per_shard, lambda m: print(m, flush=True))
            for mode in ("indexed", "tar-headers"):
                if mode == "tar-headers" and docs > args.legacy_max:
                    continue
                row = {"shards": shards, "documents": docs, "mode": mode, **in_child(folder, mode)}
                rows.append(row)
                print(f"{mode:>11}: start-up {row['startup_s']:7.2f} s, +{row['rss_added_mib']:7.1f} MiB, "
                      f"{row['tokens_per_s']:9.0f} tokens/s", flush=True)
            for path in folder.iterdir():  # the next size needs the disk
                path.unlink()
    indexed = [r for r in rows if r["mode"] == "indexed"]
    by_shards = sorted((r for r in indexed if r["documents"] // r["shards"] == indexed[0]["documents"] //
                        indexed[0]["shards"]), key=lambda r: r["shards"])
    same_shards = sorted((r for r in indexed if r["shards"] == indexed[0]["shards"]), key=lambda r: r["documents"])
    legacy = sorted((r for r in rows if r["mode"] == "tar-headers"), key=lambda r: r["documents"])
    for name, series, by, target in (("indexed", by_shards, "shards", 1e5), ("indexed", same_shards, "documents", 1e9),
                                     ("tar-headers", legacy, "documents", 1e9)):
        if len(series) < 2:
            continue
        # a slope below zero is noise around flat: extrapolated as flat
        t, m = max(0.0, growth(series, "startup_s", by)), max(0.0, growth(series, "rss_added_mib", by))
        last = series[-1]
        print(f"{name}: {1e6 * t:+.2f} us and {1024 * m:+.3f} KiB per {by[:-1]} (from {series[0][by]} to {last[by]} "
              f"{by}); at {target:.0e} {by}: start-up ~{last['startup_s'] + t * (target - last[by]):.1f} s, "
              f"~{last['rss_added_mib'] + m * (target - last[by]):.0f} MiB per rank")
    print(f"benchmark: {len(rows)} cases over {len(args.sizes)} sizes")


if __name__ == "__main__":
    main()
