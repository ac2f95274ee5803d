"""Memory and time of consolidating a large checkpoint for a resume under another layout.

    python benchmarks/reshard_scale.py [--dim 1024] [--layers 24] [--out DIR]

Trains one step of a ~280M-parameter model (d 1024, 24 layers, fp32) with ZeRO-1 over 2 processes through
`loom train` on synthetic token shards and keeps its checkpoint (about 4.5 GB). Then, each in a fresh
process: Loom's streaming consolidation (`loom ckpt consolidate`'s path: shards memory-mapped, one parameter
merged and written at a time) and, as the baseline, everything read into memory and written with safetensors
(how consolidation worked before). For each: seconds, the peak of anonymous resident memory (sampled every
10 ms; file pages of the memory-mapped shards are page cache the kernel can drop) and the peak of all
resident memory (VmHWM), against the checkpoint's size and its largest tensor.
Goal (issue 19): peak <= 0.25 x the checkpoint + the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.shards import ShardWriter, npy_bytes, write_json_atomic  # noqa: E402
from data_pipeline.token_index import index_folder  # noqa: E402
from data_pipeline.vocab import Vocabulary  # noqa: E402

LAYOUT = Vocabulary(512, 512)
REPO = Path(__file__).resolve().parents[1]


def status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def write_tokens(folder: Path) -> None:
    rng = np.random.default_rng(0)
    with ShardWriter(folder, "tokens-0", max_count=None) as w:
        for i in range(64):
            tokens = np.concatenate([[LAYOUT.bos], rng.integers(0, 512, 200), [LAYOUT.eos]]).astype(np.uint32)
            w.write({"__key__": f"{i:04d}", "tokens.npy": npy_bytes(tokens),
                     "spans.json": json.dumps([[1, len(tokens) - 1, "text"]]).encode()})
    write_json_atomic(folder / "manifest.json", {"shards": ["tokens-0.tar"], "fingerprint": "bench",
                                                 "layout": LAYOUT.to_dict()})
    index_folder(folder, log=lambda message: None)


def train_checkpoint(run: Path, tokens: Path, dim: int, layers: int) -> Path:
    heads = dim // 64
    cmd = [sys.executable, "-m", "launch.cli", "train", str(REPO / "configs" / "tiny.yaml"), f"out_dir={run}",
           f"data.sources.shapes.path={tokens}", "parallel.nproc_per_node=2", "parallel.zero_stage=1",
           f"model.dim={dim}", f"model.n_layers={layers}", f"model.n_heads={heads}", f"model.n_kv_heads={heads // 2}",
           f"model.ffn_dim={dim * 11 // 4 // 64 * 64}", "data.seq_len=64", "data.global_batch_size=2",
           "data.micro_batch_size=1", "schedule.steps=1", "schedule.warmup_steps=0", "checkpoint.interval=1",
           "logging.interval=1", "logging.peak_tflops=1"]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return run / "checkpoints" / "step_000001"


def consolidate(folder: str, mode: str) -> dict:
    """In this fresh process: one consolidation, with anonymous memory sampled every 10 ms."""
    from pretrain.checkpointing import read_config
    from pretrain.consolidate import MOMENTS, read_deepspeed
    from pretrain.portable import portable_from_deepspeed, write_portable

    folder = Path(folder)
    saved = json.loads((folder / "loom_state.json").read_text())["layout"]
    n_layers = read_config(folder).model.n_layers
    out = folder / f"portable-{mode}"
    base, peak, done = status_kib("RssAnon"), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], status_kib("RssAnon"))
            time.sleep(0.01)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    if mode == "streaming":
        portable_from_deepspeed(folder, saved, n_layers, out)
    else:
        data = read_deepspeed(folder, saved["tp"], saved["pp"], saved["dp"], saved["zero_stage"], n_layers)
        write_portable(out, data["params"], {k: data[k] for k in MOMENTS},
                       {**data["engine"], "optimizer_step": data["optimizer_step"]})
        del data
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    written = sum(f.stat().st_size for f in out.iterdir())
    shutil.rmtree(out)
    return {"seconds": seconds, "peak_anon_mib": (max(peak[0], status_kib("RssAnon")) - base) / 1024,
            "vm_hwm_mib": status_kib("VmHWM") / 1024, "written_mib": written / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--out", default=None, help="keep the run here (default: a temporary directory)")
    parser.add_argument("--consolidate", nargs=2, metavar=("CKPT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consolidate:
        print(json.dumps(consolidate(*args.consolidate)))
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        write_tokens(root / "tokens")
        print(f"training one step of d {args.dim} x {args.layers} layers on 2 processes ...", flush=True)
        folder = train_checkpoint(root / "run", root / "tokens", args.dim, args.layers)
        import math

        from pretrain.consolidate import DeepSpeedCheckpoint

        saved = json.loads((folder / "loom_state.json").read_text())["layout"]
        shards = DeepSpeedCheckpoint(folder, saved["tp"], saved["pp"], saved["dp"], saved["zero_stage"], args.layers)
        numels = [math.prod(shards.shape(name)) for name in shards.names()]
        params, largest = sum(numels), 4 * max(numels)
        size = sum(f.stat().st_size for f in folder.glob("*.pt"))
        print(f"checkpoint: {params / 1e6:.0f}M parameters, {size / 2 ** 30:.2f} GiB of DeepSpeed shards; largest "
              f"tensor {largest / 2 ** 20:.0f} MiB", flush=True)
        for mode in ("streaming", "in-memory"):
            out = subprocess.run([sys.executable, __file__, "--consolidate", str(folder), mode], check=True,
                                 capture_output=True, text=True, cwd=REPO)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            ratio = row["peak_anon_mib"] * 2 ** 20 / size
            print(f"{mode:>10}: {row['seconds']:6.1f} s, peak anonymous +{row['peak_anon_mib']:7.0f} MiB "
                  f"({ratio:.3f} x the checkpoint), VmHWM {row['vm_hwm_mib']:7.0f} MiB, wrote "
                  f"{row['written_mib']:.0f} MiB", flush=True)
    print("benchmark: 2 consolidations measured")


if __name__ == "__main__":
    main()
