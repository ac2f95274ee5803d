"""Training throughput of Loom against transformers' LlamaForCausalLM of the same size, in one run.

    python benchmarks/train_throughput.py [--sizes 10M 50M] [--dtypes fp32 bf16] [--steps 4]

Loom runs with model.compile=true unless --no-compile (compilation happens in the warm-up steps).
For each size and dtype, both do full training steps (forward, backward, AdamW) on the same batch
shape (micro-batch x 512 tokens, one document per row): Loom through its real path (megatron-core
layers, DeepSpeed engine without ZeRO: one process has nothing to shard), HF with SDPA attention (bf16: autocast with fp32 weights).
Prints tokens/s, TFLOP/s, MFU against the GEMM peak measured here (pretrain.flops), and Loom/HF.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from common.config import build  # noqa: E402
from pretrain.config import TrainConfig  # noqa: E402
from pretrain.flops import flops_per_token, matmul_params, measure_peak_tflops  # noqa: E402

SIZES = {  # ~10M and ~50M parameters with an 8192-entry vocabulary
    "10M": dict(dim=256, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=704),
    "50M": dict(dim=512, n_layers=12, n_heads=8, n_kv_heads=4, ffn_dim=1408),
}
VOCAB, SEQ = 8192, 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(size: str, bf16: bool, batch: int, compile_blocks: bool) -> TrainConfig:
    cfg = build(TrainConfig, {"model": {**SIZES[size], "vocab_size": VOCAB, "compile": compile_blocks},
                              "data": {"seq_len": SEQ, "global_batch_size": batch, "micro_batch_size": batch,
                                       "sources": {"bench": {"path": "-"}}},
                              "parallel": {"bf16": bf16, "zero_stage": 0}, "optimizer": {"grad_clip": 1.0},
                              "schedule": {"steps": 1000, "warmup_steps": 0}})
    cfg.model.resolve_preset()
    return cfg


def timed(step, steps: int) -> float:
    step()  # warm-up
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def bench_loom(cfg: TrainConfig, batch: dict, steps: int) -> float:
    from pretrain.parallel import Layout, parallelize
    from pretrain.step import run_step

    layout = Layout(0, 1, 0, 1, 1, 1, 0, torch.device("cpu"))
    engine = parallelize(cfg, layout)
    return timed(lambda: run_step(engine, [batch], cfg.model.z_loss, layout, None), steps)


def bench_hf(cfg: TrainConfig, batch: dict, steps: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.padded_vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, tie_word_embeddings=False,
        attn_implementation="sdpa"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.parallel.bf16):
            loss = model(input_ids=batch["tokens"], labels=batch["tokens"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return timed(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=2, help="sequences of 512 tokens per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps after 2 warm-up steps")
    parser.add_argument("--no-compile", action="store_true", help="run Loom's blocks eagerly (model.compile=false)")
    args = parser.parse_args()

    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain import megatron_cpu
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    megatron_cpu.apply()
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (args.batch, SEQ + 1))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": torch.arange(SEQ).expand(args.batch, SEQ),
             "doc_ids": torch.zeros(args.batch, SEQ, dtype=torch.long), "loss_kind": torch.ones(args.batch, SEQ, dtype=torch.long)}
    print(f"threads {torch.get_num_threads()}, batch {args.batch} x {SEQ} tokens")
    print(f"{'size':>5} {'dtype':>5} {'params':>7} {'peak TF/s':>9} | {'impl':>4} {'tok/s':>8} {'TFLOP/s':>8} {'MFU':>6}")
    for size in args.sizes:
        for dtype in args.dtypes:
            cfg = config(size, dtype == "bf16", args.batch, not args.no_compile)
            peak = measure_peak_tflops(cfg.model.dim, torch.bfloat16 if dtype == "bf16" else torch.float32,
                                       torch.device("cpu"), seconds=1.0)
            flops = flops_per_token(cfg.model, SEQ) * args.batch * SEQ
            seconds = {"loom": bench_loom(cfg, batch, args.steps), "hf": bench_hf(cfg, batch, args.steps)}
            params = f"{(matmul_params(cfg.model) + cfg.model.padded_vocab_size * cfg.model.dim) / 1e6:.1f}M"
            for impl, sec in seconds.items():
                tflops = flops / sec / 1e12
                print(f"{size:>5} {dtype:>5} {params:>7} {peak:9.3f} | {impl:>4} {args.batch * SEQ / sec:8.0f} "
                      f"{tflops:8.3f} {100 * tflops / peak:5.1f}%")
            print(f"{size:>5} {dtype:>5}  Loom/HF speed ratio: {seconds['hf'] / seconds['loom']:.2f}x")
    print(f"benchmark: {len(args.sizes) * len(args.dtypes)} configurations measured")


if __name__ == "__main__":
    main()
