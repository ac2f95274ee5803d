"""Layout-independent weights and optimizer states: the one form every layout reads and writes.

A DeepSpeed checkpoint is sharded three ways: tensor parallelism splits matrices, the pipeline
splits layers (named `{layer index}.{name}` by PipelineModule), and ZeRO splits the flattened fp32
masters and Adam moments over data-parallel ranks. `read_deepspeed` undoes all three from the
files alone (one process, no GPUs, any saved world size) and returns full tensors under the
canonical names of the single-process `Transformer`; `tp_slice` cuts them again for one rank of
another layout. DESIGN §6: DeepSpeed's universal checkpoints fail to load ZeRO-3 with TP > 1 and
across ZeRO stages, so Loom reads the shards itself, for every layout alike.

Which dimension tensor parallelism splits, by parameter:
    column-parallel (dim 0): embedding and output rows (vocabulary), fused qkv (grouped by kv
        head, so a contiguous split is a split by kv heads), gate, up, per-head qk-norm
    row-parallel (dim 1):    attention output, mlp down
    replicated:              RMSNorm weights
"""

from __future__ import annotations

import glob
import math
from pathlib import Path

import torch

from common.checkpoint_folders import CheckpointError

MOMENTS = ("exp_avg", "exp_avg_sq")
ROW_PARALLEL = ("attn.out.weight", "mlp.down.weight")
REPLICATED = ("attn_norm.weight", "mlp_norm.weight")


def tp_dim(name: str) -> int | None:
    """The dimension tensor parallelism splits parameter `name` along (None: replicated)."""
    if name.endswith(REPLICATED) or name == "head.norm.weight":
        return None
    return 1 if name.endswith(ROW_PARALLEL) else 0


def tp_slice(full: torch.Tensor, name: str, tp_rank: int, tp: int) -> torch.Tensor:
    dim = tp_dim(name)
    return full if dim is None or tp == 1 else full.chunk(tp, dim)[tp_rank]


def canonical_name(local: str, n_layers: int, pipeline: bool) -> str:
    """A parameter's name in the single-process Transformer, from its name in the engine's module."""
    if not pipeline:
        return local
    index, rest = local.split(".", 1)
    layer = int(index)
    if layer == 0:
        return f"embed.{rest}"
    return f"head.{rest}" if layer == n_layers + 1 else f"blocks.{layer - 1}.{rest}"


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from e


def _optim_file(ckpt: Path, dp_rank: int, mp_rank: int) -> Path:
    # bf16 runs prefix the name with "bf16_"
    found = glob.glob(str(ckpt / f"*zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"))
    if len(found) != 1:
        raise CheckpointError(f"{ckpt}: expected one optimizer shard of data-parallel rank {dp_rank}, "
                              f"model-parallel rank {mp_rank}; found {len(found)}")
    return Path(found[0])


def _zero12_shards(ckpt: Path, mp_rank: int, dp: int) -> dict:
    """ZeRO-1/2 (pipelines included): each data-parallel rank holds a contiguous slice of every
    group's flat fp32 vector; `param_slice_mappings` says where each parameter's piece lies."""
    shapes = _load(ckpt / f"mp_rank_{mp_rank:02d}_model_states.pt")["param_shapes"]
    optims = [_load(_optim_file(ckpt, d, mp_rank))["optimizer_state_dict"] for d in range(dp)]
    out, step = {}, None
    for g, group in enumerate(shapes):
        flats = [{"param": o["single_partition_of_fp32_groups"][g],
                  **{k: o["base_optimizer_state"]["state"][g][k] for k in MOMENTS}} for o in optims]
        step = float(optims[0]["base_optimizer_state"]["state"][g]["step"])
        for name, shape in group.items():
            frags = [(flat, o["param_slice_mappings"][g][name]) for flat, o in zip(flats, optims)
                     if name in o["param_slice_mappings"][g]]
            out[name] = {k: torch.cat([flat[k].narrow(0, f.start, f.numel) for flat, f in frags]).view(shape)
                         for k in ("param", *MOMENTS)}
    return {"tensors": out, "step": step}


def _zero3_shards(ckpt: Path, tp_rank: int, dp: int) -> dict:
    """ZeRO-3: every parameter is split into dp equal pieces (the last one padded); rank d's flat
    vector is its piece of every parameter, in the order of `param_shapes`."""
    shapes = _load(ckpt / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt")["param_shapes"]
    optims = [_load(_optim_file(ckpt, d, tp_rank))["optimizer_state_dict"] for d in range(dp)]
    flats = []
    for o in optims:
        states = o["optimizer_state_dict"]["state"]
        groups = sorted(states)
        flats.append({"param": torch.cat(o["fp32_flat_groups"]),
                      **{k: torch.cat([states[i][k] for i in groups]) for k in MOMENTS}})
    step = float(optims[0]["optimizer_state_dict"]["state"][0]["step"])
    out, offset = {}, 0
    for group in shapes:
        for name, shape in group.items():
            numel = math.prod(shape)
            piece = math.ceil(numel / dp)
            out[name] = {k: torch.cat([f[k].narrow(0, offset, piece) for f in flats])[:numel].view(shape)
                         for k in ("param", *MOMENTS)}
            offset += piece
    return {"tensors": out, "step": step}


def read_deepspeed(ckpt: str | Path, tp: int, pp: int, dp: int, zero_stage: int, n_layers: int) -> dict:
    """Full fp32 weights and Adam moments of a DeepSpeed checkpoint saved with layout (tp, pp, dp, zero).

    Returns {"params": {name: tensor}, "exp_avg": {...}, "exp_avg_sq": {...}, "optimizer_step": int,
    "engine": DeepSpeed's client-independent state (scheduler, global steps and samples)}."""
    ckpt = Path(ckpt)
    if zero_stage not in (1, 2, 3):
        raise CheckpointError(f"{ckpt}: ZeRO stage {zero_stage} checkpoints are not supported (use 1, 2 or 3)")
    per_tp: dict[str, list] = {}
    steps = set()
    for stage in range(pp):
        for t in range(tp):
            mp_rank = stage * tp + t
            shard = _zero3_shards(ckpt, t, dp) if zero_stage == 3 else _zero12_shards(ckpt, mp_rank, dp)
            steps.add(shard["step"])
            for local, states in shard["tensors"].items():
                per_tp.setdefault(canonical_name(local, n_layers, pp > 1), [None] * tp)[t] = states
    out = {"params": {}, **{k: {} for k in MOMENTS}}
    for name, pieces in sorted(per_tp.items()):
        dim = tp_dim(name)
        for key in ("param", *MOMENTS):
            full = pieces[0][key] if dim is None else torch.cat([p[key] for p in pieces], dim)
            out["params" if key == "param" else key][name] = full.detach().clone()
    model_file = ckpt / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if zero_stage == 3 else "mp_rank_00_model_states.pt")
    model_state = _load(model_file)
    out["optimizer_step"] = int(steps.pop())
    out["engine"] = {"lr_scheduler": model_state["lr_scheduler"], "global_steps": model_state["global_steps"],
                     "global_samples": model_state["global_samples"], "skipped_steps": model_state["skipped_steps"]}
    return out
