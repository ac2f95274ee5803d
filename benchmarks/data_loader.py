"""Loader throughput on one process, against what the model consumes and against plain webdataset.

    python benchmarks/data_loader.py [--docs 20000] [--seconds 5]

Token shards of two sources (text documents of 30-400 tokens; image-caption documents of ~90
tokens, as the quickstart world's 8x8 grids give) are written to a temporary directory. Then:
1. Loom's TokenLoader (token-weighted mixing 0.6/0.4, packing to the quickstart recipe's rows of
   256 tokens, global batch 16, random access through the shard indexes) delivers packed tokens/s;
2. plain webdataset iteration of the same shards (`wds.WebDataset`, tokens.npy decoded, nothing
   packed or mixed) delivers document tokens/s;
3. the quickstart model (configs/quickstart.yaml) trains tokens/s in one process (its real step:
   megatron-core layers, DeepSpeed engine), which is what one loader process must keep up with.
Prints the ratios loader / model (goal >= 50x) and loader / webdataset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from data_pipeline.loader import Source, TokenLoader  # noqa: E402
from data_pipeline.shards import ShardWriter, npy_bytes, write_json_atomic  # noqa: E402
from data_pipeline.token_index import index_folder  # noqa: E402
from data_pipeline.vocab import Vocabulary  # noqa: E402
from pretrain.config import build_config  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
LAYOUT = Vocabulary(512, 512)  # the quickstart's text and codebook sizes


def write_source(path: Path, name: str, docs: int, rng, image: bool) -> Source:
    shards = []
    with ShardWriter(path, "tokens", max_count=1000) as w:
        for i in range(docs):
            if image:
                caption = rng.integers(0, 512, rng.integers(8, 20))
                grid = LAYOUT.visual_offset + rng.integers(0, 512, 8 * 9)
                tokens = np.concatenate([[LAYOUT.bos], caption, grid, [LAYOUT.eos]])
                spans = [[1, 1 + len(caption), "text"], [1 + len(caption), len(tokens) - 1, "image"]]
            else:
                tokens = np.concatenate([[LAYOUT.bos], rng.integers(0, 512, rng.integers(30, 400)), [LAYOUT.eos]])
                spans = [[1, len(tokens) - 1, "text"]]
            w.write({"__key__": f"{i:08d}", "tokens.npy": npy_bytes(tokens.astype(np.uint32)),
                     "spans.json": json.dumps(spans).encode()})
        shards = [p.name for p in w.close()]
    write_json_atomic(path / "manifest.json", {"shards": shards, "fingerprint": "bench", "layout": LAYOUT.to_dict()})
    index_folder(path, log=lambda message: None)  # shard indexes and counts, as the tokenize job writes them
    return Source.open(name, path, 0.6 if not image else 0.4)


def loader_tokens_per_second(sources, cfg, seconds: float) -> float:
    d = cfg.data
    loader = TokenLoader(sources, LAYOUT, seq_len=d.seq_len, global_batch_size=d.global_batch_size,
                         micro_batch_size=d.micro_batch_size, seed=0)
    loader.next_step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loader.next_step()
        steps += 1
    return steps * d.global_batch_size * d.seq_len / (time.perf_counter() - start)


def webdataset_tokens_per_second(sources, seconds: float) -> float:
    import webdataset as wds

    urls = [str(s) for src in sources for s in src.shards]
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
            tokens += len(sample["tokens.npy"])
            if time.perf_counter() - start > seconds:
                break
    return tokens / (time.perf_counter() - start)


def model_tokens_per_second(cfg, steps: int) -> float:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain import megatron_cpu
    from train_throughput import bench_loom, free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    megatron_cpu.apply()
    b, s = cfg.data.micro_batch_size, cfg.data.seq_len
    tokens = torch.randint(0, LAYOUT.size, (b, s + 1))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": torch.arange(s).expand(b, s),
             "doc_ids": torch.zeros(b, s, dtype=torch.long), "loss_kind": torch.ones(b, s, dtype=torch.long)}
    return b * s / bench_loom(cfg, batch, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=20000, help="documents per source")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time of each loader")
    parser.add_argument("--steps", type=int, default=5, help="timed model steps")
    args = parser.parse_args()
    start = time.time()
    overrides = [f"model.vocab_size={LAYOUT.size}", "data.sources.bench.path=bench", "parallel.zero_stage=0",
                 "parallel.nproc_per_node=1"]
    cfg = build_config(RECIPE, overrides)
    cfg.model.resolve_preset()
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        sources = [write_source(Path(tmp) / "text", "text", args.docs, rng, image=False),
                   write_source(Path(tmp) / "pairs", "pairs", args.docs, rng, image=True)]
        loom = loader_tokens_per_second(sources, cfg, args.seconds)
        plain = webdataset_tokens_per_second(sources, args.seconds)
    model = model_tokens_per_second(cfg, args.steps)
    print(f"one process, {torch.get_num_threads()} threads; rows of {cfg.data.seq_len} tokens, global batch "
          f"{cfg.data.global_batch_size}:")
    print(f"  quickstart model training step:       {model:12,.0f} tokens/s   1.00x")
    print(f"  Loom loader (mixed, packed):          {loom:12,.0f} tokens/s   {loom / model:7.1f}x  (goal >= 50x)")
    print(f"  plain webdataset iteration (unpacked): {plain:11,.0f} tokens/s   loader / webdataset = "
          f"{loom / plain:.2f}x")
    print(f"data loader benchmark: done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
