"""The memory model of `loom plan` against the peak memory of real training steps on this machine.

    python benchmarks/plan_memory.py [--cases ...] [--layouts ...] [--json OUT]

Cases (model size, sequence length, micro-batch, activation checkpointing): Loom's real training path
in this process (megatron-core layers, DeepSpeed engine with ZeRO-1, fp32, one process), two optimizer
steps on packed rows of several documents. Measured = the process's peak resident memory during the
case minus its resident memory before the model was built (Linux VmHWM, reset per case through
/proc/self/clear_refs; freed memory is returned to the system between cases with malloc_trim).
Estimated = analysis.plan's peak-stage total with no reserve. Prints both and their ratio.

glibc's malloc is pinned to mmap every block of 128 KiB or more (MALLOC_MMAP_THRESHOLD_, set by re-running
this script with it): by default it raises that threshold as blocks are freed and then serves tensors from
heaps that fragment, so the peak grows from step to step by memory no tensor holds (up to +50% in PP2 with 4
micro-batches, 3 steps). Pinned, the peak is that of the live tensors and the same at every step; a GPU's
caching allocator fragments in its own way, which a plan's --reserve-gib covers.

Layouts: the terms a cluster plan turns on, each in a job of 2 processes under torchrun (gloo, one thread
each): TP2, sequence parallelism, ZeRO-2 and ZeRO-3 over DP2, PP2 with 1, 2 and 4 micro-batches per step
(1, 2 and 2 in flight on the first stage), bf16. Every rank measures its own peak as above and compares
it with the plan's estimate for its pipeline stage; a row per rank.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from common.config import build  # noqa: E402
from pretrain.config import TrainConfig  # noqa: E402

VOCAB = 8192
CASES = {  # name: (model, seq_len, micro-batch, activation checkpointing)
    "8M-s512-b4": (dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704), 512, 4, "none"),
    "20M-s256-b8": (dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=1408), 256, 8, "none"),
    "20M-s1024-b2-full": (dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=1408), 1024, 2, "full"),
    "25M-s512-b4-attention": (dict(dim=640, n_layers=3, n_heads=10, n_kv_heads=5, ffn_dim=1792), 512, 4,
                              "attention"),
    # long rows: the dense mask's s^2 term (a float s x s mask saved per block) dominates at 4k
    "8M-s2048-b1": (dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704), 2048, 1, "none"),
    "8M-s4096-b1": (dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704), 4096, 1, "none"),
}


def kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> bool:
    """VmHWM := VmRSS, so that VmHWM is this case's peak; False where /proc/self/clear_refs is not writable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


M8 = dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704)
M20 = dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=1408)
LAYOUTS = {  # name: (processes, model, seq_len, micro-batch, micro-batches per step, parallel settings)
    "tp2": (2, M20, 256, 8, 1, {"tp": 2}),
    "tp2-sequence-parallel": (2, M8, 2048, 1, 1, {"tp": 2, "sequence_parallel": True}),
    "dp2-zero2": (2, M20, 256, 8, 1, {"zero_stage": 2}),
    "dp2-zero3": (2, M20, 256, 8, 1, {"zero_stage": 3}),
    "pp2-1-micro-batch": (2, M20, 512, 4, 1, {"pp": 2}),
    "pp2-2-micro-batches": (2, M20, 512, 4, 2, {"pp": 2}),
    "pp2-4-micro-batches": (2, M20, 512, 4, 4, {"pp": 2}),
    "dp2-bf16": (2, M20, 256, 8, 1, {"bf16": True}),
}


def resident_baseline() -> int:
    """Resident bytes now, with freed memory returned to the system and the peak (VmHWM) reset to it."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak()
    return kib("VmRSS")


def config(model: dict, seq: int, micro: int, checkpointing: str, parallel: dict | None = None, steps_of: int = 1,
           dp: int = 1) -> TrainConfig:
    # attention as the CPU trains it (a dense mask), so that the plan models what is measured
    cfg = build(TrainConfig, {"model": {**model, "vocab_size": VOCAB, "activation_checkpointing": checkpointing,
                                        "attention": "sdpa"},
                              "data": {"seq_len": seq, "global_batch_size": micro * steps_of * dp,
                                       "micro_batch_size": micro, "sources": {"bench": {"path": "-"}}},
                              "parallel": {"zero_stage": 1, "backend": "gloo", **(parallel or {})},
                              "schedule": {"steps": 100, "warmup_steps": 0}})
    cfg.model.resolve_preset()
    return cfg


def packed_batch(micro: int, seq: int) -> dict:
    """Rows of four documents each, as the loader packs them (document-causal masks)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (micro, seq), generator=generator)
    doc_ids = (torch.arange(seq) * 4 // seq).repeat(micro, 1)
    positions = torch.arange(seq).repeat(micro, 1) % (seq // 4)
    return {"tokens": tokens, "positions": positions, "doc_ids": doc_ids, "targets": tokens.roll(-1, 1),
            "loss_kind": torch.ones(micro, seq, dtype=torch.long)}


def measure(name: str) -> dict:
    from pretrain.parallel import Layout, parallelize
    from analysis.plan import GIB, peak_stage
    from pretrain.step import run_step

    model, seq, micro, checkpointing = CASES[name]
    cfg = config(model, seq, micro, checkpointing)
    before = resident_baseline()
    layout = Layout(0, 1, 0, 1, 1, 1, 0, torch.device("cpu"))
    engine = parallelize(cfg, layout)
    batch = packed_batch(micro, seq)
    for _ in range(2):  # the second step holds everything: Adam's moments, gradients, activations
        run_step(engine, [batch], cfg.model.z_loss, layout, None)
    measured = kib("VmHWM") - before
    estimated = peak_stage(cfg, 1, micro, 0.0).total
    engine.destroy()
    del engine
    return {"case": name, "measured_gib": measured / GIB, "estimated_gib": estimated / GIB,
            "ratio": measured / estimated}


def measure_layout() -> None:
    """One rank of a LAYOUTS job (under torchrun): its peak against the plan's estimate for its stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from analysis.plan import GIB, MEMORY_TERMS, stage_memory
    from pretrain.parallel import destroy_distributed, init_distributed, parallelize
    from pretrain.step import PipelineLoss, run_step

    name = os.environ["LOOM_PLAN_MEMORY_LAYOUT"]
    processes, model, seq, micro, steps_of, parallel = LAYOUTS[name]
    tp, pp = parallel.get("tp", 1), parallel.get("pp", 1)
    cfg = config(model, seq, micro, "none", parallel, steps_of, processes // (tp * pp))
    torch.set_num_threads(1)
    layout = init_distributed(cfg)
    before = resident_baseline()
    pipeline_loss = PipelineLoss(cfg.model.z_loss) if pp > 1 else None
    engine = parallelize(cfg, layout, pipeline_loss)
    for _ in range(2):
        run_step(engine, [packed_batch(micro, seq)] * steps_of, cfg.model.z_loss, layout, pipeline_loss)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    estimate = stage_memory(cfg, layout.dp, stage, micro, 0.0)
    measured = kib("VmHWM") - before
    row = {"case": name, "rank": layout.rank, "stage": stage, "measured_gib": measured / GIB,
           "estimated_gib": estimate.total / GIB, "ratio": measured / estimate.total,
           "terms_gib": {k: getattr(estimate, k) / GIB for k in MEMORY_TERMS}}
    rows = [None] * layout.world_size
    dist.all_gather_object(rows, row)
    if layout.rank == 0:
        Path(os.environ["LOOM_PLAN_MEMORY_OUT"]).write_text(json.dumps(rows))
    destroy_distributed()


def measure_layout_job(name: str) -> list[dict]:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = {**os.environ, "LOOM_PLAN_MEMORY_LAYOUT": name, "LOOM_PLAN_MEMORY_OUT": str(out),
               "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={LAYOUTS[name][0]}", __file__], check=True, stdout=subprocess.DEVNULL,
                       env=env, cwd=Path(__file__).resolve().parents[1])
        return json.loads(out.read_text())


def measure_in_child(name: str, threads: int) -> dict:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        subprocess.run([sys.executable, __file__, "--cases", name, "--layouts", "--threads", str(threads), "--json",
                        str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())[0]


MMAP_THRESHOLD = "131072"


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pretrain import megatron_cpu
    from pretrain.parallel import single_process_groups

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    single_process_groups()
    megatron_cpu.apply()
    in_process = reset_peak()  # else one process per case, whose peak is its own
    rows = []
    for name in args.cases:
        row = measure(name) if in_process or len(args.cases) == 1 else measure_in_child(name, args.threads)
        rows.append(row)
        print(f"{name:<20} measured {row['measured_gib']:.3f} GiB  estimated {row['estimated_gib']:.3f} GiB  "
              f"measured/estimated {row['ratio']:.2f}", flush=True)
    for name in args.layouts:
        for row in measure_layout_job(name):
            rows.append(row)
            print(f"{name + ' rank ' + str(row['rank']):<30} stage {row['stage']}  measured {row['measured_gib']:.3f} "
                  f"GiB  estimated {row['estimated_gib']:.3f} GiB  measured/estimated {row['ratio']:.2f}", flush=True)
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    where = worst["case"] + (f" rank {worst['rank']}" if "rank" in worst else "")
    print(f"{len(args.cases)} one-process cases, {len(args.layouts)} layouts ({len(rows)} rows); worst "
          f"measured/estimated {worst['ratio']:.2f} ({where})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    if "LOOM_PLAN_MEMORY_LAYOUT" in os.environ:
        measure_layout()
    else:
        main()
