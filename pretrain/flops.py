"""Model FLOPs per token, the device's peak, and peak memory: the throughput accounting of a run.

FLOPs per trained token = 6 x (parameters of every matrix multiply: attention and MLP projections
of each block and the output layer; the embedding lookup costs none) + 12 x n_layers x dim x
seq_len for attention scores and values (forward + backward, full square as in PaLM, Chowdhery et
al. 2022, appendix B). Recomputation under activation checkpointing is not counted (it is MFU,
not hardware utilisation). The scaling-law tools use the same formula.
"""

from __future__ import annotations

import resource
import time

import torch

from .config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    d, hd = cfg.dim, cfg.head_dim
    per_block = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d + 3 * d * cfg.ffn_dim
    return cfg.n_layers * per_block + d * cfg.padded_vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.dim * seq_len


def gemm_shapes(dim: int, device: torch.device) -> list[tuple[int, int, int]]:
    """(m, k, n) of the products the peak is measured on: the model's MLP projections and large squares."""
    square = 8192 if device.type == "cuda" else 2048
    return [(4096, dim, 4 * dim), (4096, 4 * dim, dim), (square // 2,) * 3, (square,) * 3]


def measure_peak_tflops(dim: int, dtype: torch.dtype, device: torch.device, seconds: float = 1.0) -> float:
    """The device's attainable matmul TFLOP/s: the best single product over several warmed-up GEMMs
    (`gemm_shapes`), with the threads this process trains with. A ceiling, not an average: the training step's
    own products cannot beat it, so an MFU against it above 100% means the accounting is broken."""
    best = 0.0
    for m, k, n in gemm_shapes(dim, device):
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        for _ in range(2):  # warm-up: the thread pool, the kernel choice, the clocks
            a @ b
        started = time.perf_counter()
        while time.perf_counter() - started < seconds / 4:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(3):
                a @ b
            _sync(device)
            best = max(best, 3 * 2.0 * m * k * n / (time.perf_counter() - t0) / 1e12)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux


def param_counts(cfg: ModelConfig) -> dict:
    """Parameters of the model over its real vocabulary: `total`, and `non_embedding` (without the
    input embedding and the output projection, Kaplan et al.'s N)."""
    d = cfg.dim
    blocks = matmul_params(cfg) - d * cfg.padded_vocab_size + cfg.n_layers * 2 * d
    if cfg.qk_norm:
        blocks += cfg.n_layers * 2 * (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim
    non_embedding = blocks + d  # + the final norm
    return {"total": non_embedding + 2 * cfg.vocab_size * d, "non_embedding": non_embedding}
