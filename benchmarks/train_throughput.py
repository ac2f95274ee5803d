"""Training throughput of Loom against transformers' LlamaForCausalLM of the same size, in one run.

    python benchmarks/train_throughput.py [--sizes 10M 50M] [--dtypes fp32 bf16] [--rows packed single] [--steps 4]

Loom runs with model.compile=true unless --no-compile (compilation happens in the warm-up steps).
For each size, dtype and kind of row, both do full training steps (forward, backward, AdamW) on the same
batch (micro-batch x 512 tokens): Loom through its real path (megatron-core layers, DeepSpeed engine without
ZeRO: one process has nothing to shard, the attention kernel model.attention=auto picks here), HF with SDPA
attention (bf16: autocast with fp32 weights). Rows are 'packed' (documents of 32..256 tokens, as Loom trains:
HF gets the equivalent 4D document-causal mask and per-document positions, so both compute the same loss) or
'single' (one document per row: causal attention for both).
Prints tokens/s, TFLOP/s, MFU against the GEMM peak measured in this process with the same threads
(pretrain.flops.measure_peak_tflops: a ceiling, so an MFU above 100% stops the run), and Loom/HF.
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
from pretrain.attention import dense_document_mask, single_document_rows  # noqa: E402
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


def hf_model(cfg: TrainConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=m.padded_vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, tie_word_embeddings=False,
        attn_implementation="sdpa"))


def hf_inputs(batch: dict) -> dict:
    """What transformers needs for the same loss: positions per document and, for packed rows, the 4D
    document-causal mask (True: attend), which transformers uses as given."""
    inputs = {"input_ids": batch["tokens"], "position_ids": batch["positions"], "labels": batch["tokens"]}
    if not single_document_rows(batch["doc_ids"]):
        inputs["attention_mask"] = dense_document_mask(batch["doc_ids"])  # the mask Loom's sdpa kernel takes
    return inputs


def check_hf_mask(cfg: TrainConfig, batch: dict) -> None:
    """The 4D mask isolates documents: a packed row's logits equal those of its first document alone."""
    model = hf_model(cfg).eval()
    first = int((batch["doc_ids"][0] == batch["doc_ids"][0, 0]).sum())
    with torch.no_grad():
        packed = model(**{k: v[:1] for k, v in hf_inputs(batch).items() if k != "labels"}).logits[0, :first]
        alone = model(input_ids=batch["tokens"][:1, :first]).logits[0]
    assert torch.allclose(packed, alone, atol=1e-4), "transformers ignored the 4D document mask"


def bench_hf(cfg: TrainConfig, batch: dict, steps: int) -> float:
    model = hf_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    inputs = hf_inputs(batch)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.parallel.bf16):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return timed(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--rows", nargs="+", default=["packed", "single"], choices=["packed", "single"])
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
    batches = {kind: make_batch(args.batch, kind == "packed") for kind in args.rows}
    if "packed" in batches:
        check_hf_mask(config("10M", False, args.batch, False), batches["packed"])
    print(f"threads {torch.get_num_threads()}, batch {args.batch} x {SEQ} tokens")
    print(f"{'size':>5} {'dtype':>5} {'rows':>6} {'params':>7} {'peak TF/s':>9} | {'impl':>4} {'tok/s':>8} "
          f"{'TFLOP/s':>8} {'MFU':>6}")
    for size in args.sizes:
        for dtype in args.dtypes:
            cfg = config(size, dtype == "bf16", args.batch, not args.no_compile)
            peak = measure_peak_tflops(cfg.model.dim, torch.bfloat16 if dtype == "bf16" else torch.float32,
                                       torch.device("cpu"))
            flops = flops_per_token(cfg.model, SEQ) * args.batch * SEQ
            params = f"{(matmul_params(cfg.model) + cfg.model.padded_vocab_size * cfg.model.dim) / 1e6:.1f}M"
            for kind, batch in batches.items():
                seconds = {"loom": bench_loom(cfg, batch, args.steps), "hf": bench_hf(cfg, batch, args.steps)}
                for impl, sec in seconds.items():
                    tflops = flops / sec / 1e12
                    print(f"{size:>5} {dtype:>5} {kind:>6} {params:>7} {peak:9.3f} | {impl:>4} "
                          f"{args.batch * SEQ / sec:8.0f} {tflops:8.3f} {100 * tflops / peak:5.1f}%", flush=True)
                    if tflops > peak:
                        raise SystemExit(f"{impl}: {tflops:.3f} TFLOP/s above the measured peak {peak:.3f}: the peak "
                                         f"or the FLOP count is wrong")
                print(f"{size:>5} {dtype:>5} {kind:>6}  Loom/HF speed ratio: {seconds['hf'] / seconds['loom']:.2f}x",
                      flush=True)
    print(f"benchmark: {len(args.sizes) * len(args.dtypes) * len(batches)} configurations measured")


def make_batch(rows: int, packed: bool) -> dict:
    """Rows of SEQ tokens: documents of 32..256 tokens packed (positions restart per document), or one per row."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (rows, SEQ + 1), generator=g)
    doc_ids = torch.zeros(rows, SEQ, dtype=torch.long)
    positions = torch.arange(SEQ).repeat(rows, 1)
    if packed:
        for r in range(rows):
            doc = torch.repeat_interleave(torch.arange(SEQ), torch.randint(32, 257, (SEQ,), generator=g))[:SEQ]
            starts = torch.cat([torch.zeros(1, dtype=torch.long), (doc[1:] != doc[:-1]).nonzero()[:, 0] + 1])
            doc_ids[r], positions[r] = doc, torch.arange(SEQ) - starts[doc]
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions, "doc_ids": doc_ids,
            "loss_kind": torch.ones(rows, SEQ, dtype=torch.long)}


if __name__ == "__main__":
    main()
