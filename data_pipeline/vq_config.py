"""The visual tokenizer's config tree (`loom data visual-tokenizer train CONFIG [overrides]`).

Same conventions as the training config (pretrain/config.py): dataclasses with a doc per field,
YAML plus dotted overrides, validated before any process starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import Emu3VQVAEConfig

from common.config import ConfigError, build, doc, load_tree

from .media import Geometry
from .tokenize_config import TokenizeSource
from .vocab import MAX_SCALE_MAPS


@dataclass
class VQModelConfig:
    codebook_size: int = doc("Number of codes K (the transformer's visual vocabulary).", 512)
    embed_dim: int = doc("Code dimension; low dimensions keep more of the codebook in use.", 16)
    base_channels: int = doc("Width of the first conv stage; a multiple of 32 (GroupNorm).", 32)
    channel_multiplier: list[int] = doc("Width multiplier per stage; len - 1 stages halve the "
                                        "resolution (4 stages: 8x).", factory=lambda: [1, 1, 2, 2])
    num_res_blocks: int = doc("Residual blocks per stage.", 1)
    scale_maps: list[int] = doc("The scale kind (VAR): sides of the token maps a latent frame is quantized into, "
                                "coarse to fine, each fit to the residual of the ones before, the last the full "
                                "latent grid (e.g. [1, 2, 3, 4, 6, 8] for 64x64 images at 8x). Empty: one map, "
                                "the token kind. Needs codebook.l2_normalize=false.", factory=list)
    from_pretrained: str = doc("Start from this local HF Emu3VQVAE (or Emu3 model) directory instead of "
                               "random weights; its architecture replaces the fields above.", "")

    def hf_config(self) -> Emu3VQVAEConfig:
        return Emu3VQVAEConfig(
            codebook_size=self.codebook_size, embed_dim=self.embed_dim, latent_channels=self.embed_dim,
            base_channels=self.base_channels, channel_multiplier=list(self.channel_multiplier),
            num_res_blocks=self.num_res_blocks, attn_resolutions=[],
            hidden_size=self.base_channels * self.channel_multiplier[-1],
            **({"loom_scale_maps": list(self.scale_maps)} if self.scale_maps else {}))


@dataclass
class CodebookConfig:
    l2_normalize: bool = doc("Compare unit-length latents with unit-length codes (cosine); keeps usage high "
                             "as K grows. Saved codes have unit rows, so transformers' lookup agrees.", True)
    update: str = doc("'loss' (codebook loss, trained by the optimizer) or 'ema' (moving averages of the "
                      "latents assigned to each code).", "loss")
    ema_decay: float = doc("Decay of the EMA codebook update.", 0.99)
    commitment: float = doc("Weight of the commitment loss |z - sg(e)|^2.", 0.25)
    restart_dead_every: int = doc("Every this many steps, codes unused over that window restart at random "
                                  "latents of the current batch (0: never).", 25)


@dataclass
class VQDataConfig:
    raw: list[str] = doc("Raw-document shard directories with the images and videos to train on.",
                         factory=list)
    sources: list[TokenizeSource] = doc("Inputs in the formats `loom data tokenize` reads (img2dataset shards, "
                                        "video-caption shards, interleaved rows; docs/data.md 'Point Loom at your "
                                        "data'), besides or instead of `raw`; their caption filters apply.",
                                        factory=list)
    geometry: Geometry = doc("Size of images and video frames, and the limits that skip an input.",
                             factory=Geometry)
    scales: list[float] = doc("Each image and video is also used at these fractions of its size (multi-resolution "
                              "training). A conv VQ trained at one scale reconstructs another poorly (measured: "
                              "29.0 dB at 64x64 but 17.1 dB at 32x32 for one trained at 64x64).",
                              factory=lambda: [1.0])
    video_frames: int = doc("Frames sampled uniformly from each video, whatever its length and fps; "
                            "a multiple of 4 (4 frames make one latent frame).", 8)
    max_clips: int = doc("Images plus videos held in memory per process (the first ones read; each also at "
                         "its `scales`).", 4000)
    eval_clips: int = doc("Clips of process 0 held out from training and used for eval.", 64)


@dataclass
class VQOptimConfig:
    steps: int = doc("Optimizer steps.", 1000)
    batch_size: int = doc("Images per step, over all processes (divisible by the number of processes).", 16)
    video_batch_size: int = doc("Videos per step when a step draws videos, over all processes.", 4)
    lr: float = doc("Adam learning rate (constant; a warmup + cosine schedule measured no better).", 2e-3)
    bf16: bool = doc("Autocast the conv nets to bfloat16 (codes, losses and weights stay fp32).", False)


@dataclass
class VQCheckpointConfig:
    interval: int = doc("Save a resumable checkpoint every this many steps (0: only at the end).", 250)
    keep_last: int = doc("Complete checkpoints kept.", 2)


@dataclass
class VQLoggingConfig:
    interval: int = doc("Console and metrics.jsonl every this many steps.", 10)
    usage_window: int = doc("Codebook usage and perplexity are over the codes of this many recent steps.", 100)
    eval_interval: int = doc("Held-out PSNR/SSIM/usage and side-by-side images every this many steps.", 250)
    tensorboard: bool = doc("Write TensorBoard events to OUT/tensorboard.", True)


@dataclass
class VQConfig:
    out_dir: str = doc("Output: the final HF Emu3VQVAE files, checkpoints/, tensorboard/, metrics.jsonl.",
                       "runs/vq")
    seed: int = doc("Seed of initialisation, batch order and code restarts.", 0)
    nproc_per_node: int = doc("Processes `loom data visual-tokenizer train` starts with torchrun when "
                              "not already under it (DDP).", 1)
    threads: int = doc("torch threads per process (0: cores / processes).", 0)
    model: VQModelConfig = doc("Architecture (transformers' Emu3VQVAE).", factory=VQModelConfig)
    codebook: CodebookConfig = doc("Quantizer.", factory=CodebookConfig)
    data: VQDataConfig = doc("Training data.", factory=VQDataConfig)
    optim: VQOptimConfig = doc("Optimizer and steps.", factory=VQOptimConfig)
    checkpoint: VQCheckpointConfig = doc("Resumable checkpoints.", factory=VQCheckpointConfig)
    logging: VQLoggingConfig = doc("Console, metrics and TensorBoard.", factory=VQLoggingConfig)


def validate_vq(cfg: VQConfig, world_size: int = 1) -> None:
    m, o, d = cfg.model, cfg.optim, cfg.data
    if not d.raw and not d.sources:
        raise ConfigError("data.raw: give at least one raw shard directory, e.g. data.raw=[runs/quickstart/raw], "
                          "or data.sources in any input format")
    for path in d.raw:
        if not Path(path).is_dir():
            raise ConfigError(f"data.raw: directory not found: {path}")
    if not m.from_pretrained:
        if m.base_channels % 32:
            raise ConfigError(f"model.base_channels={m.base_channels}: use a multiple of 32 (GroupNorm groups)")
        if 2 ** (len(m.channel_multiplier) - 1) != d.geometry.multiple:
            raise ConfigError(f"model.channel_multiplier has {len(m.channel_multiplier)} stages, a "
                              f"{2 ** (len(m.channel_multiplier) - 1)}x downsampling; data.geometry.multiple "
                              f"is {d.geometry.multiple}: make them agree")
    elif not (Path(m.from_pretrained) / "config.json").is_file():
        raise ConfigError(f"model.from_pretrained: {m.from_pretrained} is not a directory with config.json")
    maps = m.scale_maps
    if maps:
        if m.from_pretrained:
            raise ConfigError("model.scale_maps with model.from_pretrained: a pretrained tokenizer keeps its own "
                              "quantizer; leave model.scale_maps empty")
        if len(maps) > MAX_SCALE_MAPS:
            raise ConfigError(f"model.scale_maps has {len(maps)} maps; next-scale training logs at most "
                              f"{MAX_SCALE_MAPS}")
        if any(b <= a for a, b in zip(maps, maps[1:])) or maps[0] < 1:
            raise ConfigError(f"model.scale_maps={maps}: give increasing sides from 1, e.g. [1, 2, 3, 4, 6, 8]")
        grid = d.geometry.size // d.geometry.multiple
        if d.geometry.mode == "crop" and maps[-1] != grid:  # other grids scale the sides in proportion
            raise ConfigError(f"model.scale_maps ends at {maps[-1]}, but data.geometry.size {d.geometry.size} at "
                              f"{d.geometry.multiple}x gives a {grid}x{grid} latent grid: end the list at {grid}")
        if cfg.codebook.l2_normalize:
            raise ConfigError("model.scale_maps needs codebook.l2_normalize=false: residuals shrink map by map, "
                              "unit-length codes cannot fit them")
    if cfg.codebook.update not in ("loss", "ema"):
        raise ConfigError(f"codebook.update='{cfg.codebook.update}': use 'loss' or 'ema'")
    if not d.scales or any(not 0 < x <= 1 for x in d.scales):
        raise ConfigError(f"data.scales={d.scales}: give fractions in (0, 1], e.g. [1.0, 0.5]")
    if d.video_frames % 4:
        raise ConfigError(f"data.video_frames={d.video_frames}: use a multiple of 4 (one latent frame per 4)")
    for name, value in (("optim.batch_size", o.batch_size), ("optim.video_batch_size", o.video_batch_size)):
        if value < world_size or value % world_size:
            raise ConfigError(f"{name}={value} must be a positive multiple of the {world_size} processes")
    if o.steps < 1:
        raise ConfigError("optim.steps must be at least 1")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be at least 1")


def load_vq_config(path: str | Path | None, overrides: list[str] = (), world_size: int = 1,
                   launching: bool = False) -> VQConfig:
    """Build and validate, once per process. world_size: the processes training; launching: this process
    starts them (nproc_per_node)."""
    cfg = build(VQConfig, load_tree(path, overrides))
    validate_vq(cfg, cfg.nproc_per_node if launching else world_size)
    return cfg

