"""Layout-independent weights and optimizer states: the one form every layout reads and writes.

A DeepSpeed checkpoint is sharded three ways: tensor parallelism splits matrices, the pipeline
splits layers (named `{layer index}.{name}` by PipelineModule), and ZeRO splits the flattened fp32
masters and Adam moments over data-parallel ranks. `DeepSpeedCheckpoint` undoes all three from the
files alone (one process, no GPUs, any saved world size), one full tensor at a time under the
canonical names of the single-process `Transformer`, with the shards memory-mapped (so memory holds
one parameter, not the checkpoint); `tp_slice` cuts them again for one rank of another layout.
DESIGN §6: DeepSpeed's universal checkpoints fail to load ZeRO-3 with TP > 1 and across ZeRO
stages, so Loom reads the shards itself, for every layout alike.

Which dimension tensor parallelism splits, by parameter:
    column-parallel (dim 0): embedding and output rows (vocabulary), fused qkv (grouped by kv
        head, so a contiguous split is a split by kv heads), gate, up, per-head qk-norm
    row-parallel (dim 1):    attention output, mlp down
    replicated:              RMSNorm weights
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from common.checkpoint_folders import CheckpointError

MOMENTS = ("exp_avg", "exp_avg_sq")
TESTED_DEEPSPEED = "0.19"  # the checkpoint layout and the ZeRO internals below and in portable.py
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
    """A DeepSpeed file with its tensors memory-mapped: a parameter's slice is read from disk when it is used, so
    consolidating holds one parameter at a time, not the shards."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from e


def _optim_file(ckpt: Path, dp_rank: int, mp_rank: int) -> Path:
    # bf16 runs prefix the name with "bf16_"
    found = glob.glob(str(ckpt / f"*zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"))
    if len(found) != 1:
        raise CheckpointError(f"{ckpt}: expected one optimizer shard of data-parallel rank {dp_rank}, "
                              f"model-parallel rank {mp_rank}; found {len(found)}")
    return Path(found[0])


@dataclass
class Piece:
    """One TP rank's part of a parameter: where its elements lie in the data-parallel ranks' flat fp32 vectors
    (one vector per state: the master weights and Adam's moments)."""

    shape: tuple
    fragments: list  # (flat vectors by state, start, numel), in order

    def tensor(self, state: str) -> torch.Tensor:
        whole = torch.cat([flats[state].narrow(0, start, numel) for flats, start, numel in self.fragments])
        return whole[:math.prod(self.shape)].view(self.shape)


def _zero12_pieces(ckpt: Path, mp_rank: int, dp: int) -> tuple[dict[str, Piece], float]:
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
            out[name] = Piece(tuple(shape), [(flat, o["param_slice_mappings"][g][name].start,
                                              o["param_slice_mappings"][g][name].numel)
                                             for flat, o in zip(flats, optims) if name in o["param_slice_mappings"][g]])
    return out, step


def _zero3_pieces(ckpt: Path, tp_rank: int, dp: int) -> tuple[dict[str, Piece], float]:
    """ZeRO-3: every parameter is split into dp equal pieces (the last one padded); rank d's flat
    vectors hold its piece of every parameter, in the order of `param_shapes`, group after group."""
    shapes = _load(ckpt / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt")["param_shapes"]
    optims = [_load(_optim_file(ckpt, d, tp_rank))["optimizer_state_dict"] for d in range(dp)]
    group_flats = []  # per group: per data-parallel rank, its flat vector of each state
    for g in range(len(shapes)):
        group_flats.append([{"param": o["fp32_flat_groups"][g],
                             **{k: o["optimizer_state_dict"]["state"][g][k] for k in MOMENTS}} for o in optims])
    step = float(optims[0]["optimizer_state_dict"]["state"][0]["step"])
    out = {}
    for g, group in enumerate(shapes):
        offset = 0
        for name, shape in group.items():
            piece = math.ceil(math.prod(shape) / dp)
            out[name] = Piece(tuple(shape), [(flats, offset, piece) for flats in group_flats[g]])
            offset += piece
    return out, step


class DeepSpeedCheckpoint:
    """A DeepSpeed checkpoint saved with layout (tp, pp, dp, zero), read one full parameter at a time: `names()`,
    `shape(name)`, `full(name, state)` (state 'param' or an Adam moment), under the canonical names of the
    single-process `Transformer`, from the files alone (one process, no GPUs, any saved world size)."""

    def __init__(self, ckpt: str | Path, tp: int, pp: int, dp: int, zero_stage: int, n_layers: int):
        ckpt = Path(ckpt)
        if zero_stage not in (1, 2, 3):
            raise CheckpointError(f"{ckpt}: ZeRO stage {zero_stage} checkpoints are not supported (use 1, 2 or 3)")
        model_file = ckpt / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if zero_stage == 3
                             else "mp_rank_00_model_states.pt")
        model_state = _load(model_file)
        self.pieces: dict[str, list] = {}  # canonical name -> its piece on each TP rank
        steps = set()
        try:
            for stage in range(pp):
                for t in range(tp):
                    mp_rank = stage * tp + t
                    pieces, step = (_zero3_pieces(ckpt, t, dp) if zero_stage == 3
                                    else _zero12_pieces(ckpt, mp_rank, dp))
                    steps.add(step)
                    for local, piece in pieces.items():
                        self.pieces.setdefault(canonical_name(local, n_layers, pp > 1), [None] * tp)[t] = piece
        except (KeyError, AttributeError, IndexError) as e:  # the files' layout is DeepSpeed's, not a public format
            raise CheckpointError(
                f"{ckpt}: its ZeRO-{zero_stage} files lack {e!r}: they were written by DeepSpeed "
                f"{model_state.get('ds_version', '(unknown)')}, and Loom reads the layout of DeepSpeed "
                f"{TESTED_DEEPSPEED} (pyproject.toml's range)") from None
        self.optimizer_step = int(steps.pop())
        self.engine = {k: model_state[k] for k in ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")}

    def names(self) -> list[str]:
        return sorted(self.pieces)

    def shape(self, name: str) -> tuple:
        pieces, dim = self.pieces[name], tp_dim(name)
        shape = list(pieces[0].shape)
        if dim is not None:
            shape[dim] = sum(p.shape[dim] for p in pieces)
        return tuple(shape)

    def full(self, name: str, state: str) -> torch.Tensor:
        pieces, dim = self.pieces[name], tp_dim(name)
        return pieces[0].tensor(state).clone() if dim is None else torch.cat([p.tensor(state) for p in pieces], dim)


def read_deepspeed(ckpt: str | Path, tp: int, pp: int, dp: int, zero_stage: int, n_layers: int) -> dict:
    """Everything of a DeepSpeed checkpoint in memory: {"params": {name: tensor}, "exp_avg": {...}, "exp_avg_sq":
    {...}, "optimizer_step": int, "engine": DeepSpeed's client-independent state (scheduler, step counters)}."""
    source = DeepSpeedCheckpoint(ckpt, tp, pp, dp, zero_stage, n_layers)
    out = {"params": {n: source.full(n, "param") for n in source.names()},
           **{k: {n: source.full(n, k) for n in source.names()} for k in MOMENTS}}
    return out | {"optimizer_step": source.optimizer_step, "engine": source.engine}
