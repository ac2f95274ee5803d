"""Loom's training step at GPU scale on one device, in one run, written as one JSON file.

    bash benchmarks/gpu_check.sh                      # on a GPU host (see that script)
    python benchmarks/gpu_check.py --smoke --out X    # the same code at toy sizes on the CPU (a test runs it)

Sections; each is timed and guarded (one that fails records its error, the others still run):
- flex_vs_dense: the tiny model in fp32 on packed rows: FlexAttention's compiled kernel against the dense
  mask, loss and every gradient within 1e-5 relative; eager and compiled blocks.
- throughput: a ~1B emu3 model (d 2048, 16 layers, vocabulary 65536), bf16 (DeepSpeed), seq 4096, compiled
  blocks, through Loom's real path (init_distributed, parallelize, run_step): flex on packed rows of several
  documents, SDPA with the dense mask on the same rows, SDPA causal on one document per row; transformers'
  LlamaForCausalLM of the same size (SDPA, bf16 autocast) on one document per row. Tokens/s, TFLOP/s
  (pretrain.flops), MFU against the chip's dense bf16 peak (--peak-tflops, 989 for an H100/H200 SXM) and against
  the GEMM peak measured here; peak memory against `loom plan`'s estimate for the same config.
- long_rows: the ~50M model, bf16, flex, one row of 2k/8k/16k/32k tokens, recomputation none and full: peak
  memory, its growth per token, and the plan's estimate.
- visual_tokenizer: Emu3's tokenizer architecture (base 256, multipliers 1 2 2 4, 32768 codes), images/s of
  encoding 256x256 images in bf16.
Goals (the issue): MFU >= 55% for the 1B model, plan within 15% of measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import build  # noqa: E402
from common.distributed import plan_device  # noqa: E402

DEVICE_TYPE = plan_device("auto").device_type
os.environ.setdefault("DS_ACCELERATOR", DEVICE_TYPE)  # before DeepSpeed is imported

from pretrain.config import TrainConfig  # noqa: E402
from pretrain.flops import flops_per_token, measure_peak_tflops, param_counts  # noqa: E402

FULL = {"1B": dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=5632),
        "50M": dict(dim=512, n_layers=12, n_heads=8, n_kv_heads=4, ffn_dim=1408),
        "vocab": 65536, "long_vocab": 8192, "seq": 4096, "micro": 4, "steps": 6,
        "long_seqs": [2048, 8192, 16384, 32768], "vq": dict(base_channels=256, channel_multiplier=[1, 2, 2, 4],
                                                            num_res_blocks=2, codebook_size=32768, embed_dim=4),
        "vq_size": 256, "vq_batch": 16}
SMOKE = {"1B": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176),
         "50M": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176),
         "vocab": 512, "long_vocab": 512, "seq": 256, "micro": 2, "steps": 2, "long_seqs": [256, 512],
         "vq": dict(base_channels=32, channel_multiplier=[1, 1, 2, 2], num_res_blocks=1, codebook_size=512,
                    embed_dim=4),
         "vq_size": 32, "vq_batch": 2}


def config(model: dict, vocab: int, seq: int, micro: int, attention: str, checkpointing: str = "none",
           compile_blocks: bool = DEVICE_TYPE == "cuda", bf16: bool = True) -> TrainConfig:
    """compile_blocks: on CUDA; the CPU cannot differentiate compiled FlexAttention."""
    cfg = build(TrainConfig, {
        "model": {**model, "vocab_size": vocab, "attention": attention, "compile": compile_blocks,
                  "activation_checkpointing": checkpointing},
        "data": {"seq_len": seq, "global_batch_size": micro, "micro_batch_size": micro,
                 "sources": {"x": {"path": "-"}}},
        "parallel": {"bf16": bf16, "zero_stage": 1}, "schedule": {"steps": 1000, "warmup_steps": 0}})
    cfg.model.resolve_preset()
    return cfg


def rows(micro: int, seq: int, vocab: int, packed: bool, seed: int = 0) -> dict:
    """A micro-batch as the loader makes it: packed rows of documents of 128..2048 tokens, or one per row."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (micro, seq + 1), generator=g)
    doc_ids = torch.zeros(micro, seq, dtype=torch.long)
    positions = torch.arange(seq).repeat(micro, 1)
    if packed:
        for r in range(micro):
            lengths = torch.randint(min(128, seq // 4), min(2048, seq // 2) + 1, (seq,), generator=g)
            doc = torch.repeat_interleave(torch.arange(seq), lengths)[:seq]
            doc_ids[r] = doc
            starts = torch.cat([torch.zeros(1, dtype=torch.long), (doc[1:] != doc[:-1]).nonzero()[:, 0] + 1])
            positions[r] -= starts[doc]
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions, "doc_ids": doc_ids,
            "loss_kind": torch.ones(micro, seq, dtype=torch.long)}


def sync():
    if DEVICE_TYPE == "cuda":
        torch.cuda.synchronize()


def reset_memory():
    gc.collect()
    if DEVICE_TYPE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE_TYPE == "cuda" else None


def loom_steps(cfg: TrainConfig, layout, batch: dict, steps: int) -> tuple[float, float]:
    """Seconds per step (after 2 warm-up steps that compile) and the loss of the last step."""
    from pretrain.parallel import parallelize
    from pretrain.step import run_step

    engine = parallelize(cfg, layout)
    for _ in range(2):
        sums, _ = run_step(engine, [batch], cfg.model.z_loss, layout, None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        sums, _ = run_step(engine, [batch], cfg.model.z_loss, layout, None)
    sync()
    seconds = (time.perf_counter() - start) / steps
    loss = float(sums[0].sum() / sums[1].sum())
    engine.destroy()  # its memory must not count in the next case's peak
    return seconds, loss


def hf_steps(cfg: TrainConfig, batch: dict, steps: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.padded_vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, tie_word_embeddings=False,
        attn_implementation="sdpa")).to(DEVICE_TYPE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = batch["tokens"].to(DEVICE_TYPE)

    def step():
        with torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(2):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def flex_vs_dense(sizes: dict, layout) -> dict:
    """Loss and gradients of one forward/backward, flex against the dense mask (fp32, packed rows)."""
    from pretrain.model import Transformer
    from pretrain.parallel import tensor_parallel_of

    out = {}
    batch = {k: v.to(layout.device) for k, v in rows(2, 640, 200, packed=True, seed=1).items()}
    for compiled in (False, True) if DEVICE_TYPE == "cuda" else (False,):
        grads, losses = {}, {}
        for attention in ("sdpa", "flex"):
            cfg = config(SMOKE["1B"], 200, 640, 2, attention, compile_blocks=compiled, bf16=False)
            model = Transformer(cfg.model, tensor_parallel_of(cfg), cfg.seed).to(layout.device)
            if compiled:
                for block in model.blocks:
                    block.compile()
            logits = model(batch["tokens"], batch["positions"], batch["doc_ids"])[..., :200]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 200), batch["targets"].T.reshape(-1))
            loss.backward()
            losses[attention], grads[attention] = float(loss), {n: p.grad for n, p in model.named_parameters()}
        worst = max(float((grads["flex"][n] - g).norm() / g.norm()) for n, g in grads["sdpa"].items())
        loss_rel = abs(losses["flex"] - losses["sdpa"]) / losses["sdpa"]
        out["compiled" if compiled else "eager"] = {"loss_relative": loss_rel, "worst_grad_relative": worst,
                                                    "within_1e-5": loss_rel <= 1e-5 and worst <= 1e-5}
    return out


def throughput(sizes: dict, layout, peak_tflops: float, steps: int) -> dict:
    from analysis.plan import GIB, peak_stage

    seq, micro, vocab = sizes["seq"], sizes["micro"], sizes["vocab"]
    packed, single = rows(micro, seq, vocab, True), rows(micro, seq, vocab, False)
    gemm_peak = measure_peak_tflops(sizes["1B"]["dim"], torch.bfloat16, layout.device)
    out = {"params": param_counts(config(sizes["1B"], vocab, seq, micro, "flex").model)["total"],
           "seq": seq, "micro_batch": micro, "docs_per_packed_row": float(
               sum(len(torch.unique(r)) for r in packed["doc_ids"]) / micro),
           "peak_tflops_nominal": peak_tflops, "peak_tflops_measured_gemm": gemm_peak}
    cases = {"loom_flex_packed": ("flex", packed), "loom_sdpa_dense_mask_packed": ("sdpa", packed),
             "loom_sdpa_causal_single_document": ("sdpa", single)}
    flops = None
    for name, (attention, batch) in cases.items():
        cfg = config(sizes["1B"], vocab, seq, micro, attention)
        flops = flops_per_token(cfg.model, seq) * micro * seq
        reset_memory()
        try:
            seconds, loss = loom_steps(cfg, layout, batch, steps)
        except Exception as e:  # one kernel failing must not hide the others' figures
            out[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        plan_gib = peak_stage(cfg, 1, micro, 0).total / GIB
        out[name] = report(seconds, flops, micro * seq, peak_tflops, gemm_peak) | {
            "loss": loss, "peak_memory_gib": peak_gib(), "plan_memory_gib": plan_gib}
    reset_memory()
    seconds = hf_steps(config(sizes["1B"], vocab, seq, micro, "sdpa"), single, steps)
    out["hf_llama_sdpa_single_document"] = report(seconds, flops, micro * seq, peak_tflops, gemm_peak) | {
        "peak_memory_gib": peak_gib()}
    for name in cases:
        if "seconds_per_step" in out.get(name, {}):
            out[name]["speed_vs_hf"] = out["hf_llama_sdpa_single_document"]["seconds_per_step"] / \
                out[name]["seconds_per_step"]
    return out


def report(seconds: float, flops: float, tokens: int, peak: float, gemm_peak: float) -> dict:
    tflops = flops / seconds / 1e12
    return {"seconds_per_step": seconds, "tokens_per_s": tokens / seconds, "tflops": tflops,
            "mfu_vs_nominal_peak": tflops / peak, "mfu_vs_measured_gemm_peak": tflops / gemm_peak}


def long_rows(sizes: dict, layout, attention: str) -> dict:
    """Peak memory of one training step on one row of each length (2 steps; the second is measured)."""
    from analysis.plan import GIB, peak_stage

    out = {}
    for checkpointing in ("none", "full"):
        series = {}
        for seq in sizes["long_seqs"]:
            cfg = config(sizes["50M"], sizes["long_vocab"], seq, 1, attention, checkpointing, compile_blocks=False)
            reset_memory()
            try:
                seconds, _ = loom_steps(cfg, layout, rows(1, seq, sizes["long_vocab"], True), 1)
            except Exception as e:
                series[seq] = {"error": f"{type(e).__name__}: {e}"[:1000]}
                continue
            series[seq] = {"peak_memory_gib": peak_gib(), "seconds_per_step": seconds,
                           "plan_memory_gib": peak_stage(cfg, 1, 1, 0).total / GIB}
        measured = [(s, r["peak_memory_gib"]) for s, r in series.items() if r.get("peak_memory_gib")]
        if len(measured) >= 3:  # bytes per token between successive lengths: flat if memory is linear in s
            series["gib_per_1k_tokens"] = [1024 * (b - a) / (t - s) for (s, a), (t, b) in zip(measured, measured[1:])]
        out[checkpointing] = series
    return out


def visual_tokenizer(sizes: dict, device) -> dict:
    from data_pipeline.visual_tokenizer import VisualTokenizer
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    vq = sizes["vq"]  # as data_pipeline.vq_config builds it (not imported: its video reader needs PyAV)
    tok = VisualTokenizer(Emu3VQVAE(Emu3VQVAEConfig(
        codebook_size=vq["codebook_size"], embed_dim=vq["embed_dim"], latent_channels=vq["embed_dim"],
        base_channels=vq["base_channels"], channel_multiplier=vq["channel_multiplier"],
        num_res_blocks=vq["num_res_blocks"], attn_resolutions=[],
        hidden_size=vq["base_channels"] * vq["channel_multiplier"][-1]))).to(device).eval()
    size, batch = sizes["vq_size"], sizes["vq_batch"]
    pixels = torch.rand(batch, 1, 3, size, size, device=device) * 2 - 1
    with torch.autocast(device.type, dtype=torch.bfloat16):
        tok.encode(pixels)
        sync()
        start, repeats = time.perf_counter(), 5
        for _ in range(repeats):
            tok.encode(pixels)
        sync()
    return {"image_size": size, "batch": batch, "images_per_s": repeats * batch / (time.perf_counter() - start),
            "params": sum(p.numel() for p in tok.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (the CPU check of this script)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the chip's dense bf16 peak")
    parser.add_argument("--sections", nargs="+", default=["throughput", "flex_vs_dense", "long_rows",
                                                          "visual_tokenizer"], help="in order of importance: the "
                        "JSON is written after each, so a run cut short keeps the first ones")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    from pretrain.parallel import init_distributed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    attention = "flex" if DEVICE_TYPE == "cuda" else "sdpa"  # the CPU has no flex backward
    layout = init_distributed(config(sizes["1B"], sizes["vocab"], sizes["seq"], sizes["micro"], attention))
    results = {"device": torch.cuda.get_device_name() if DEVICE_TYPE == "cuda" else "cpu",
               "torch": torch.__version__, "smoke": args.smoke, "attention_for_long_rows": attention}
    runs = {"flex_vs_dense": lambda: flex_vs_dense(sizes, layout),
            "throughput": lambda: throughput(sizes, layout, args.peak_tflops, sizes["steps"]),
            "long_rows": lambda: long_rows(sizes, layout, attention),
            "visual_tokenizer": lambda: visual_tokenizer(sizes, layout.device)}
    for section in args.sections:
        started = time.perf_counter()
        print(f"gpu_check: {section} ...", flush=True)
        try:
            results[section] = runs[section]()
        except Exception as e:
            results[section] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        results[section + "_seconds"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(results, indent=2))  # what finished survives a later crash or kill
        print(json.dumps({section: results[section]}, indent=1)[:3000], flush=True)
    print(f"gpu_check: {len(args.sections)} sections in {sum(results[s + '_seconds'] for s in args.sections):.0f} s, "
          f"{sum('error' in json.dumps(results[s]) for s in args.sections)} with errors; results in {args.out}")


if __name__ == "__main__":
    main()
