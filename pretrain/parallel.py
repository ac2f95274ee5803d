"""Process groups and `parallelize`: the one place where parallelism is applied to the model.

DESIGN §5: megatron-core owns the process groups (`initialize_model_parallel`, rank order
tp-cp-ep-dp-pp) and the tensor-parallel layers; DeepSpeed owns data parallelism, ZeRO, bf16,
gradient clipping and accumulation, and pipelining (pretrain/pipeline.py). DeepSpeed sees
megatron's groups through `MegatronMPU`, or through the pipeline topology, which orders ranks alike.
Context parallelism (CP) splits each row along the sequence: the ranks of a CP group hold the same
weights and the same rows, each its part of them, so to DeepSpeed they are data-parallel ranks
(gradients are averaged and ZeRO partitions over data x context, as megatron's distributed optimizer does).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from common.config import ConfigError
from common.distributed import init_process_group
from . import accelerator  # noqa: F401  (before DeepSpeed)
from .config import TrainConfig

import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402

from . import megatron_cpu  # noqa: E402
from .attention import flex_trains_on, kernel_for  # noqa: E402
from .model import Block, RMSNorm, TensorParallel, Transformer, is_norm  # noqa: E402
from .pipeline import pipeline_module  # noqa: E402


@dataclass(frozen=True)
class Layout:
    """This process's place in the parallel layout: global rank, the TP/PP/DP sizes, its data-parallel rank."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    dp_rank: int
    device: torch.device
    cp: int = 1
    cp_rank: int = 0


def init_distributed(cfg: TrainConfig) -> Layout:
    """torch.distributed from torchrun's environment, then megatron's TP/PP/DP groups."""
    # the group's timeout is longer than the watchdog's step timeout (pretrain/resilience.py), whose message says more
    process = init_process_group(cfg.parallel.backend, timeout_s=cfg.faults.step_timeout_s + 60)
    check_device(cfg, process.device)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    if process.device.type == "cpu":
        megatron_cpu.apply()
    p = cfg.parallel
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
                                             context_parallel_size=p.cp)
    return Layout(process.rank, process.world_size, process.local_rank, p.tp, p.pp,
                  process.world_size // (p.tp * p.cp * p.pp), parallel_state.get_data_parallel_rank(), process.device,
                  p.cp, parallel_state.get_context_parallel_rank())


def check_device(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse a DeepSpeed accelerator other than the training device (DeepSpeed picked it when first imported,
    from DS_ACCELERATOR or the host) and an attention kernel that cannot train there."""
    ds_device = get_accelerator().device_name()
    if ds_device != device.type:
        raise ConfigError(f"DeepSpeed's accelerator is '{ds_device}' but this process trains on {device.type} "
                          f"(parallel.backend={cfg.parallel.backend}): set DS_ACCELERATOR={device.type} before "
                          f"starting, or change parallel.backend")
    if kernel_for(cfg.model.attention, device) == "flex" and not flex_trains_on(device.type):
        raise ConfigError(f"model.attention=flex: FlexAttention in torch {torch.__version__} has no backward on "
                          f"{device.type}; use model.attention=auto or sdpa there")


def single_process_groups() -> None:
    """A one-process gloo group and megatron's TP/PP groups of size 1, for tools that run a checkpoint's model
    in one process (evaluation, generation)."""
    if not dist.is_initialized():
        # an in-memory store: no port, and no rendezvous with a torchrun job this process may have been
        # started from (under TORCHELASTIC_USE_AGENT_STORE a tcp:// group would wait for that job's store)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def destroy_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMPU:
    """megatron's parallel_state under the names DeepSpeed's engine asks for (`mpu=`). Its data-parallel group
    includes the context-parallel ranks: they average gradients and share ZeRO partitions like data-parallel ones."""

    def __getattr__(self, name):
        return getattr(parallel_state, name)

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank(with_context_parallel=True)

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())


def megatron_config(cfg: TrainConfig) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=cfg.parallel.tp, pipeline_model_parallel_size=cfg.parallel.pp,
        sequence_parallel=cfg.parallel.sequence_parallel,
        pipeline_dtype=torch.bfloat16 if cfg.parallel.bf16 else torch.float32,  # unused: DeepSpeed pipelines
        # Whole weights are initialised on the CPU and then split: the same model for any layout.
        use_cpu_initialization=True, perform_initialization=True, params_dtype=torch.float32,
        gradient_accumulation_fusion=False)


def tensor_parallel_of(cfg: TrainConfig) -> TensorParallel:
    """What the model is built for: megatron's layer config and megatron's TP (and CP) group of this rank."""
    context = parallel_state.get_context_parallel_group() if parallel_state.get_context_parallel_world_size() > 1 \
        else None
    return TensorParallel(megatron_config(cfg), parallel_state.get_tensor_model_parallel_group(), context)


def lr_lambda(cfg: TrainConfig):
    s = cfg.schedule

    def factor(step: int) -> float:
        if s.warmup_steps and step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        progress = min(1.0, (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps))
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def grad_accum_steps(cfg: TrainConfig, layout: Layout) -> int:
    return cfg.data.global_batch_size // (layout.dp * cfg.data.micro_batch_size)


def deepspeed_config(cfg: TrainConfig, layout: Layout) -> dict:
    d, p = cfg.data, cfg.parallel
    return {
        "train_micro_batch_size_per_gpu": d.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, layout),
        "train_batch_size": d.global_batch_size * layout.cp,  # DeepSpeed counts a CP rank's part of a row as a row
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": p.bf16},
        # torch's AdamW: DeepSpeed's fused Adam needs CUDA, and it is the same update.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
    }


def sequence_parallel_norms(model: torch.nn.Module) -> None:
    """Under SP each TP rank normalises a slice of the sequence, so a norm weight's gradient is a partial
    sum: route the weight through megatron's copy-to-TP region (identity forward, all-reduce backward)."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight_fn = tensor_parallel.copy_to_tensor_model_parallel_region


def activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Recompute each block ('full') or each attention sublayer ('attention') in the backward pass,
    by wrapping the instance's forward in a non-reentrant checkpoint (parameter names unchanged)."""
    if mode == "none":
        return
    for module in model.modules():
        if isinstance(module, Block):
            target = module if mode == "full" else module.attn
            target.forward = functools.partial(checkpoint, target.forward, use_reentrant=False)


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile every block (after recomputation is applied, so checkpointed forwards compile too)."""
    for module in model.modules():
        if isinstance(module, Block):
            module.compile()


def parallelize(cfg: TrainConfig, layout: Layout, pipeline_loss=None):
    """Build the model and apply parallelism, in this order:

    1. tensor (and sequence) parallelism: the megatron-core layers shard themselves over the TP
       group as they are built; layer i is initialised from seed (seed, i) as a whole matrix on
       the CPU and then split, so every layout starts from the same weights; SP norms get their
       gradient all-reduce;
    2. pipeline staging (pp > 1): a DeepSpeed PipelineModule that builds only this stage's layers;
    3. activation checkpointing of blocks or attention sublayers;
    4. torch.compile of the blocks (model.compile);
    5. placement on the device;
    6. data parallelism, ZeRO, bf16, clipping and accumulation: DeepSpeed's engine, which sees
       megatron's groups through MegatronMPU (plain engine) or the matching pipeline topology.
    Returns the DeepSpeed engine (a PipelineEngine when pp > 1).
    """
    tp = tensor_parallel_of(cfg)
    if cfg.parallel.pp > 1:
        model = pipeline_module(cfg, tp, pipeline_loss, layout.dp)
    else:
        model = Transformer(cfg.model, tp, cfg.seed)
    if cfg.parallel.sequence_parallel:
        sequence_parallel_norms(model)
    activation_checkpointing(model, cfg.model.activation_checkpointing)
    if cfg.model.compile:
        compile_blocks(model)
    model.to(layout.device)
    no_decay = [p for n, p in model.named_parameters() if is_norm(n)]
    decay = [p for n, p in model.named_parameters() if not is_norm(n)]
    o = cfg.optimizer
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    # DeepSpeed refuses an mpu with a pipeline; its grid from the topology matches megatron's groups
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, layout),
                                           mpu=MegatronMPU() if cfg.parallel.pp == 1 else None)
    return engine
