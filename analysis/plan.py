"""`loom plan`: whether a layout fits and how long it trains, before any GPU hour is spent.

Parameters and FLOPs per token come from pretrain/flops.py (the formulas of the MFU that training logs).
Memory is estimated per GPU for every pipeline stage, and the most loaded stage decides:

- model states, as DeepSpeed holds them (bytes per parameter of the stage, P = its parameters / TP):
  weights in the training precision (w = 2 in bf16, 4 in fp32; divided by DP under ZeRO-3), and per
  data-parallel rank 1/DP of: fp32 master weights (4) and Adam's two moments (8). Under context
  parallelism DP here is data x context ranks: ZeRO partitions over both.
- gradients: in the training precision (w; divided by DP under ZeRO-2/3) plus DeepSpeed's reduce bucket,
  min(P, 5e8 elements) x w (ZeRO-3 on a GPU allocates all 5e8), and for the optimizer step the fp32
  gradient partition (4/DP). ZeRO-1/2 hold them from the first backward to the step, ZeRO-3 allocates its
  gradient buffers once, at start.
- ZeRO-3 gathers each parameter whole for the forward and backward passes and, with DeepSpeed's default
  reuse distance (1e9), keeps them gathered: min(P, 1e9 elements) x w.
- activations saved for the backward pass, per block and micro-batch of t = seq_len x micro_batch / CP tokens
  (e = 2 or 4 bytes per element; h, g query and kv heads, hd head_dim, f ffn_dim, TP splits the heads):
    two RMSNorms: fp32 input, normalised and scaled outputs          2 (4 + 2e) t d
    attention: fused qkv, rotated q and k, SDPA output, its copy     e t hd (4h + 3g) / TP
      and the kernel's logsumexp per query head                      4 t h / TP
      with a dense mask (model.attention=sdpa on packed rows): SDPA
      saves it as a float (mb, 1, s/CP, s) tensor in every block     e t s
      (and the boolean mask, once per micro-batch: t s); flex and one-document rows have no s^2 term.
      A plan is for GPUs, where model.attention=auto means flex.
      under CP, the keys and values gathered from the whole row     2 e mb s g hd / TP
    qk-norm (chameleon): its inputs and outputs                      4 e t hd (h + g) / TP
    SwiGLU: gate, up, silu(gate), their product                      4 e t f / TP
  with activation checkpointing 'full' only each block's input is kept (e t d) and one block is recomputed
  at a time; with 'attention' the attention part is recomputed. Under sequence parallelism the d-sized
  tensors are split by TP too. A 1F1B pipeline stage k keeps min(PP - k, micro-batches) micro-batches in
  flight; the last stage holds one micro-batch's logits for the loss, t V / TP x 8 bytes in either
  precision (fp32: the logits and the cross-entropy's copy, in which the backward forms their gradient;
  bf16: the logits, their fp32 copy and the bf16 gradient). Under a pipeline, DeepSpeed's last stage also
  keeps the logits of its last two micro-batches in its buffers, after their backward and between steps
  (its backward pass returns before it frees them): min(2, micro-batches) x t V / TP x e.
- a reserve for what is not modelled (CUDA context, NCCL buffers, allocator fragmentation): --reserve-gib.

The peak is the model states plus the larger of two phases: forward/backward (activations, logits, ZeRO-3's
gathered parameters, and the gradients of earlier micro-batches when a step accumulates several) and the
optimizer step (the gradients and the fp32 gradient partition); what lives in one phase is freed before
the other.

These are the tensors Loom's model saves (measured with saved-tensor hooks on the CPU); benchmarks/
plan_memory.py compares the estimate with the peak memory of real runs on this machine.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from common.config import ConfigError
from pretrain.config import TrainConfig, validate
from pretrain.attention import kernel_for
from pretrain.flops import flops_per_token, param_counts

GIB = 2 ** 30
CUDA = torch.device("cuda")
BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce_bucket_size
LIVE_PARAMETERS = 1e9  # DeepSpeed's default stage3_max_live_parameters
LOGIT_BYTES = 8  # per logit of the last stage, in fp32 and in bf16 (module docstring)


@dataclasses.dataclass
class StageMemory:
    stage: int
    blocks: int
    params: int
    """Parameters on one GPU of this stage."""
    weights: float
    optimizer: float
    """fp32 master weights and Adam's moments."""
    gradients: float
    """Training-precision gradients and DeepSpeed's reduce bucket."""
    step_gradients: float
    """The fp32 gradient partition of the optimizer step."""
    gathered: float
    """ZeRO-3: the whole parameters, gathered for forward and backward."""
    activations: float
    logits: float
    pipeline_outputs: float
    """The logits DeepSpeed's last pipeline stage keeps in its buffers, in both phases."""
    reserve: float
    accumulating: bool
    """A step of several micro-batches: gradients live through the later micro-batches' forward passes."""
    zero3: bool
    """ZeRO-3 allocates its gradient buffers at start: they live through both phases."""

    @property
    def forward_backward(self) -> float:
        held = self.gradients if self.accumulating and not self.zero3 else 0.0
        return self.activations + self.logits + self.gathered + held

    @property
    def step(self) -> float:
        return (0.0 if self.zero3 else self.gradients) + self.step_gradients

    @property
    def total(self) -> float:
        persistent = self.weights + self.optimizer + (self.gradients if self.zero3 else 0.0) + self.pipeline_outputs
        persistent += self.reserve
        return persistent + max(self.forward_backward, self.step)


def block_params(cfg: TrainConfig) -> tuple[int, int]:
    """(parameters of one block split by TP, replicated ones) — norms are replicated."""
    m = cfg.model
    split = m.dim * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim + m.n_heads * m.head_dim * m.dim + 3 * m.dim * m.ffn_dim
    if m.qk_norm:
        split += 2 * (m.n_heads + m.n_kv_heads) * m.head_dim
    return split, 2 * m.dim


def dense_mask(cfg: TrainConfig) -> bool:
    """Whether attention over packed rows takes a dense s x s mask (pretrain/attention.py) on a GPU."""
    return kernel_for(cfg.model.attention, CUDA) == "sdpa"


def block_activations(cfg: TrainConfig, micro_batch: int, mode: str) -> tuple[float, float]:
    """(bytes one block keeps for the backward pass, bytes it holds while it is recomputed) per micro-batch."""
    m, p = cfg.model, cfg.parallel
    e = 2 if p.bf16 else 4
    t = cfg.data.seq_len * micro_batch // p.cp  # this rank's tokens: its part of each row under CP
    sp = p.tp if p.sequence_parallel else 1
    norms = 2 * (4 + 2 * e) * t * m.dim / sp
    attention = e * t * m.head_dim * (4 * m.n_heads + 3 * m.n_kv_heads) / p.tp + 4 * t * m.n_heads / p.tp
    if dense_mask(cfg):
        attention += e * t * cfg.data.seq_len
    if p.cp > 1:  # the keys and values of the whole row, gathered from the CP group
        attention += 2 * e * micro_batch * cfg.data.seq_len * m.n_kv_heads * m.head_dim / p.tp
    if m.qk_norm:
        attention += 4 * e * t * m.head_dim * (m.n_heads + m.n_kv_heads) / p.tp
    mlp = 4 * e * t * m.ffn_dim / p.tp
    block_input = e * t * m.dim / sp
    if mode == "full":
        return block_input, norms + attention + mlp
    if mode == "attention":
        return norms + mlp + block_input, attention
    return norms + attention + mlp, 0.0


def stage_memory(cfg: TrainConfig, dp: int, stage: int, micro_batch: int, reserve_gib: float) -> StageMemory:
    m, p = cfg.model, cfg.parallel
    blocks_per_stage = math.ceil(m.n_layers / p.pp)
    first = stage * blocks_per_stage
    blocks = max(0, min(m.n_layers, first + blocks_per_stage) - first)
    split, replicated = block_params(cfg)
    params = blocks * (split // p.tp + replicated)
    if stage == 0:
        params += m.padded_vocab_size * m.dim // p.tp
    if stage == p.pp - 1:
        params += m.padded_vocab_size * m.dim // p.tp + m.dim
    w = 2 if p.bf16 else 4
    zero = p.zero_stage
    shards = dp * p.cp  # ZeRO partitions over data- and context-parallel ranks alike
    weights = params * w / (shards if zero == 3 else 1)
    gradients = params * w / (shards if zero >= 2 else 1) + min(params, BUCKET_ELEMENTS) * w
    optimizer = params * (4 + 8) / shards
    gathered = min(params, LIVE_PARAMETERS) * w if zero == 3 else 0.0
    grad_accum = cfg.data.global_batch_size // (dp * micro_batch) or 1
    in_flight = min(p.pp - stage, grad_accum) if p.pp > 1 else 1
    kept, recomputed = block_activations(cfg, micro_batch, m.activation_checkpointing)
    activations = in_flight * blocks * kept + (recomputed if blocks else 0)
    if dense_mask(cfg) and blocks:
        activations += in_flight * micro_batch * cfg.data.seq_len ** 2 // p.cp  # the boolean mask blocks share
    t = cfg.data.seq_len * micro_batch // p.cp
    last = stage == p.pp - 1
    logits = t * m.padded_vocab_size / p.tp * LOGIT_BYTES if last else 0.0
    kept = min(2, grad_accum) * t * m.padded_vocab_size / p.tp * (2 if p.bf16 else 4) if last and p.pp > 1 else 0.0
    return StageMemory(stage, blocks, params, weights, optimizer, gradients, params * 4 / shards, gathered,
                       activations, logits, kept, reserve_gib * GIB, grad_accum > 1, zero == 3)


def peak_stage(cfg: TrainConfig, dp: int, micro_batch: int, reserve_gib: float) -> StageMemory:
    return max((stage_memory(cfg, dp, s, micro_batch, reserve_gib) for s in range(cfg.parallel.pp)),
               key=lambda sm: sm.total)


def largest_micro_batch(cfg: TrainConfig, dp: int, gpu_bytes: float, reserve_gib: float) -> int:
    """The largest micro-batch (up to the global batch per data-parallel rank) whose peak stage fits; 0: none."""
    best = 0
    for micro in range(1, cfg.data.global_batch_size // dp + 1):
        if peak_stage(cfg, dp, micro, reserve_gib).total > gpu_bytes:
            break
        best = micro
    return best


MEMORY_TERMS = ("weights", "optimizer", "gradients", "step_gradients", "gathered", "activations", "logits",
                "pipeline_outputs", "reserve")


def plan(cfg: TrainConfig, gpus: int, gpu_memory_gib: float, peak_tflops: float, mfu: float, tokens: float,
         reserve_gib: float) -> dict:
    """Everything `loom plan` prints. Raises ConfigError when the layout is invalid."""
    if cfg.model.vocab_size < 1:
        raise ConfigError("model.vocab_size is 0 (taken from the data at training time): set it, e.g. "
                          "model.vocab_size=184622 for Emu3's vocabulary, or give data.sources with a manifest")
    validate(cfg, gpus)
    m, p, d = cfg.model, cfg.parallel, cfg.data
    dp = gpus // (p.tp * p.cp * p.pp)
    counts = param_counts(m)
    per_token = flops_per_token(m, d.seq_len)
    peak = peak_stage(cfg, dp, d.micro_batch_size, reserve_gib)
    no_ac, full_ac = (peak_stage(dataclasses.replace(cfg, model=dataclasses.replace(m, activation_checkpointing=mode)),
                                 dp, d.micro_batch_size, 0).activations / GIB for mode in ("none", "full"))
    tokens_per_s = gpus * peak_tflops * 1e12 * mfu / per_token
    step_tokens = d.global_batch_size * d.seq_len
    return {
        "layout": {"gpus": gpus, "tp": p.tp, "cp": p.cp, "pp": p.pp, "dp": dp, "zero_stage": p.zero_stage,
                   "bf16": p.bf16,
                   "sequence_parallel": p.sequence_parallel, "activation_checkpointing": m.activation_checkpointing,
                   "micro_batch_size": d.micro_batch_size,
                   "gradient_accumulation": d.global_batch_size // (dp * d.micro_batch_size),
                   "global_batch_size": d.global_batch_size, "seq_len": d.seq_len, "tokens_per_step": step_tokens},
        "vocabulary": {"size": m.vocab_size, "padded": m.padded_vocab_size,
                       "rows_per_tp_rank": m.padded_vocab_size // p.tp},
        "parameters": {"total": counts["total"], "non_embedding": counts["non_embedding"],
                       "per_gpu_peak_stage": peak.params},
        "flops_per_token": per_token,
        "memory_gib": {"stage": peak.stage, "blocks_on_stage": peak.blocks,
                       **{k: getattr(peak, k) / GIB for k in MEMORY_TERMS + ("forward_backward", "step", "total")},
                       "accumulating": peak.accumulating, "zero3": peak.zero3,
                       "activations_without_checkpointing": no_ac, "activations_with_full_checkpointing": full_ac,
                       "gpu": gpu_memory_gib, "fits": peak.total <= gpu_memory_gib * GIB},
        "largest_micro_batch": largest_micro_batch(cfg, dp, gpu_memory_gib * GIB, reserve_gib),
        "throughput": {"peak_tflops_per_gpu": peak_tflops, "mfu": mfu, "tokens_per_s": tokens_per_s,
                       "tokens_per_s_per_gpu": tokens_per_s / gpus, "step_seconds": step_tokens / tokens_per_s},
        "training": {"tokens": tokens, "steps": math.ceil(tokens / step_tokens), "days": tokens / tokens_per_s / 86400,
                     "gpu_hours": tokens / tokens_per_s * gpus / 3600},
    }


def format_plan(report: dict) -> str:
    lay, mem, thr, tr, par = (report[k] for k in ("layout", "memory_gib", "throughput", "training", "parameters"))
    cp = f"CP {lay['cp']} x " if lay["cp"] > 1 else ""
    voc = report["vocabulary"]
    rows = [
        ("layout", f"{lay['gpus']} GPUs = TP {lay['tp']} x {cp}PP {lay['pp']} x DP {lay['dp']}, "
                   f"ZeRO-{lay['zero_stage']}, "
                   f"{'bf16' if lay['bf16'] else 'fp32'}{', sequence parallel' if lay['sequence_parallel'] else ''}, "
                   f"activation checkpointing {lay['activation_checkpointing']}"),
        ("batch", f"{lay['global_batch_size']} x {lay['seq_len']} = {lay['tokens_per_step']:,} tokens per step; "
                  f"micro-batch {lay['micro_batch_size']}, {lay['gradient_accumulation']} accumulation steps"),
        ("vocabulary", f"{voc['size']:,} ids padded to {voc['padded']:,} "
                       f"({voc['rows_per_tp_rank']:,} rows per TP rank)"),
        ("parameters", f"{par['total'] / 1e9:.2f} B total, {par['non_embedding'] / 1e9:.2f} B without embeddings; "
                       f"{par['per_gpu_peak_stage'] / 1e9:.2f} B on a GPU of the fullest stage"),
        ("FLOPs/token", f"{report['flops_per_token'] / 1e9:.1f} GFLOP (6N + attention)"),
        (f"memory/GPU (stage {mem['stage']}, {mem['blocks_on_stage']} blocks)",
         memory_line(mem)),
        ("activations", f"{mem['activations_without_checkpointing']:.1f} GiB without checkpointing, "
                        f"{mem['activations_with_full_checkpointing']:.1f} GiB with full checkpointing"),
        ("largest micro-batch", str(report["largest_micro_batch"]) if report["largest_micro_batch"]
         else "none fits: add TP/PP, ZeRO, activation checkpointing or GPUs"),
        ("throughput", f"{thr['tokens_per_s']:,.0f} tokens/s ({thr['tokens_per_s_per_gpu']:,.0f} per GPU) at "
                       f"MFU {thr['mfu']:.0%} of {thr['peak_tflops_per_gpu']:g} TFLOP/s; "
                       f"{thr['step_seconds']:.2f} s/step"),
        ("training", f"{tr['tokens']:.3g} tokens = {tr['steps']:,} steps: {tr['days']:.1f} days, "
                     f"{tr['gpu_hours']:,.0f} GPU-hours"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def memory_line(mem: dict) -> str:
    """'weights + optimizer [+ grads] + reserve + the larger phase (its terms) = total', in GiB."""
    states = f"weights {mem['weights']:.1f} + optimizer {mem['optimizer']:.1f}"
    states += f" + grads {mem['gradients']:.1f}" if mem["zero3"] else ""
    states += f" + pipeline outputs {mem['pipeline_outputs']:.1f}" if mem["pipeline_outputs"] else ""
    forward = [f"activations {mem['activations']:.1f}"] + ([f"logits {mem['logits']:.1f}"] if mem["logits"] else [])
    forward += [f"gathered params {mem['gathered']:.1f}"] if mem["zero3"] else []
    forward += [f"accumulated grads {mem['gradients']:.1f}"] if mem["accumulating"] and not mem["zero3"] else []
    step = ([] if mem["zero3"] else [f"grads {mem['gradients']:.1f}"]) + [f"fp32 grads {mem['step_gradients']:.1f}"]
    phases = [("forward/backward", mem["forward_backward"], forward), ("optimizer step", mem["step"], step)]
    (name, _, terms), (other, other_gib, _) = sorted(phases, key=lambda ph: -ph[1])
    return (f"{states} + reserve {mem['reserve']:.1f} + {name} ({' + '.join(terms)}) = {mem['total']:.1f} GiB "
            f"of {mem['gpu']:g}: {'fits' if mem['fits'] else 'DOES NOT FIT'} (the {other} needs "
            f"{other_gib:.1f})")
