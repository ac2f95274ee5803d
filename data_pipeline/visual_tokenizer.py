"""The visual tokenizer: transformers' Emu3VQVAE architecture with Loom's own training step.

DESIGN §3: Emu3VQVAE has no training forward and its `encode()` crops video codes wrongly, so Loom
calls the submodules directly: encoder -> quant_conv -> nearest code (straight-through) ->
post_quant_conv -> decoder. Images are repeated `temporal_downsample_factor` (4) times along time,
as Emu3 does, so one image gives one latent frame; a clip of T frames gives T/4 latent frames.
The checkpoint is an HF `Emu3VQVAE` directory (config.json + safetensors), so released Emu3
tokenizer weights load the same way.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Emu3VQVAEConfig
from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

from .media import MediaError, decode_image, decode_video
from .raw import SkipCounter, iter_documents


@dataclass
class VQTrainConfig:
    codebook_size: int = 256
    embed_dim: int = 16
    base_channels: int = 32
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2)
    num_res_blocks: int = 1
    image_size: int = 32
    video_frames: int = 8
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    commitment: float = 0.25
    restart_dead_codes_every: int = 25
    seed: int = 0
    max_images: int = 4000

    def hf_config(self) -> Emu3VQVAEConfig:
        return Emu3VQVAEConfig(
            codebook_size=self.codebook_size, embed_dim=self.embed_dim, latent_channels=self.embed_dim,
            base_channels=self.base_channels, channel_multiplier=list(self.channel_multiplier),
            num_res_blocks=self.num_res_blocks, attn_resolutions=[],
            hidden_size=self.base_channels * self.channel_multiplier[-1])


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float in [-1, 1] (Emu3's normalisation)."""
    return torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    return pixels.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()


class VisualTokenizer(torch.nn.Module):
    """Encode pixels to codes and decode codes to pixels; also the VQ training loss."""

    def __init__(self, vq: Emu3VQVAE):
        super().__init__()
        self.vq = vq
        self.temporal = vq.config.temporal_downsample_factor
        self.spatial = 2 ** (len(vq.config.channel_multiplier) - 1)

    @classmethod
    def from_config(cls, cfg: VQTrainConfig) -> "VisualTokenizer":
        torch.manual_seed(cfg.seed)
        return cls(Emu3VQVAE(cfg.hf_config()))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "VisualTokenizer":
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory}: not an Emu3VQVAE directory (no config.json)")
        return cls(Emu3VQVAE.from_pretrained(directory)).eval()

    def save_pretrained(self, directory: str | Path) -> None:
        self.vq.save_pretrained(directory)

    @property
    def codebook_size(self) -> int:
        return self.vq.config.codebook_size

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> continuous latents (B, T/4, C, H/8, W/8)."""
        hidden = self.vq.encoder(pixels)                                   # (B, t, C, h, w)
        return self.vq.quant_conv(hidden.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, t, C, h, w) -> code ids (B, t, h, w)."""
        flat = z.permute(0, 1, 3, 4, 2).reshape(-1, z.shape[2])            # (N, C)
        codebook = self.vq.quantize.embedding.weight                       # (K, C)
        distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.T
        b, t, _, h, w = z.shape
        return distances.argmin(1).view(b, t, h, w)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, t, h, w) -> (B, t, C, h, w)."""
        return self.vq.quantize.embedding(codes).permute(0, 1, 4, 2, 3)

    def decode_quantized(self, quant: torch.Tensor) -> torch.Tensor:
        """(B, t, C, h, w) -> pixels (B, 4t, 3, 8h, 8w)."""
        b, t, _, h, w = quant.shape
        post = self.vq.post_quant_conv(quant.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
        video = self.vq.decoder(post, quant)                               # (B * 4t, 3, 8h, 8w)
        return video.reshape(b, t * self.temporal, 3, h * self.spatial, w * self.spatial)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) in [-1, 1] -> codes (B, T/4, H/8, W/8). Eval mode: BatchNorm must not move."""
        if pixels.shape[1] % self.temporal:
            raise ValueError(f"a clip needs a multiple of {self.temporal} frames, got {pixels.shape[1]}")
        return self.nearest_codes(self.latents(pixels))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, t, h, w) -> pixels (B, 4t, 3, 8h, 8w) in [-1, 1]."""
        return self.decode_quantized(self.embed_codes(codes)).clamp(-1, 1)

    def encode_image(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> codes (H/8, W/8)."""
        clip = to_pixels(rgb[None]).repeat(self.temporal, 1, 1, 1)[None]
        return self.encode(clip)[0, 0].numpy()

    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        """(T, H, W, 3) uint8, T a multiple of 4 -> codes (T/4, H/8, W/8)."""
        return self.encode(to_pixels(frames)[None])[0].numpy()

    def decode_image(self, codes: np.ndarray) -> np.ndarray:
        """codes (h, w) -> (8h, 8w, 3) uint8."""
        pixels = self.decode(torch.as_tensor(codes, dtype=torch.long)[None, None])
        return to_uint8(pixels[0, :1])[0]

    def decode_video(self, codes: np.ndarray) -> np.ndarray:
        """codes (t, h, w) -> (4t, 8h, 8w, 3) uint8."""
        return to_uint8(self.decode(torch.as_tensor(codes, dtype=torch.long)[None])[0])

    def training_loss(self, pixels: torch.Tensor, commitment: float) -> tuple[torch.Tensor, dict]:
        """VQ-VAE loss on a clip batch (B, T, 3, H, W): reconstruction + codebook + commitment."""
        z = self.latents(pixels)
        codes = self.nearest_codes(z.detach())
        quant = self.embed_codes(codes)
        codebook_loss = F.mse_loss(quant, z.detach())
        commit_loss = F.mse_loss(z, quant.detach())
        quant_st = z + (quant - z).detach()                                # straight-through estimator
        recon = self.decode_quantized(quant_st)
        recon_loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels)
        loss = recon_loss + codebook_loss + commitment * commit_loss
        mse = F.mse_loss(recon.detach().clamp(-1, 1), pixels).item()
        psnr = 10 * math.log10(4.0 / max(mse, 1e-10))                      # peak-to-peak range is 2
        return loss, {"loss": loss.item(), "recon": recon_loss.item(), "codebook": codebook_loss.item(),
                      "psnr": psnr, "codes": codes, "latents": z.detach()}


def load_training_clips(raw_dirs, cfg: VQTrainConfig, skipped: SkipCounter) -> torch.Tensor:
    """All images (repeated to 4 frames) and 4-frame windows of videos as (N, 4, 3, H, W)."""
    clips = []
    for where, segments in iter_documents(raw_dirs, skipped):
        for seg in segments:
            try:
                if seg.kind == "image":
                    clips.append(to_pixels(decode_image(seg.data, cfg.image_size)[None]).repeat(4, 1, 1, 1))
                elif seg.kind == "video":
                    frames = to_pixels(decode_video(seg.data, cfg.video_frames, cfg.image_size))
                    clips += [frames[i:i + 4] for i in range(0, cfg.video_frames - 3, 4)]
            except MediaError as e:
                skipped.add(f"bad_{seg.kind}", f"{where}: {e}")
        if len(clips) >= cfg.max_images:
            break
    if not clips:
        raise ValueError(f"no images or videos found in {', '.join(map(str, raw_dirs))}")
    return torch.stack(clips)


def train_visual_tokenizer(raw_dirs, out_dir: str | Path, cfg: VQTrainConfig, log=print) -> dict:
    """Train on the images and videos of raw shards; writes an HF Emu3VQVAE directory to out_dir."""
    out_dir = Path(out_dir)
    skipped = SkipCounter()
    clips = load_training_clips(raw_dirs, cfg, skipped)
    tokenizer = VisualTokenizer.from_config(cfg)
    tokenizer.train()
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    rng = random.Random(cfg.seed)
    usage = torch.zeros(cfg.codebook_size, dtype=torch.long)
    start, history = time.time(), []
    for step in range(1, cfg.steps + 1):
        batch = clips[rng.sample(range(len(clips)), min(cfg.batch_size, len(clips)))]
        loss, stats = tokenizer.training_loss(batch, cfg.commitment)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        usage += torch.bincount(stats["codes"].flatten(), minlength=cfg.codebook_size)
        if cfg.restart_dead_codes_every and step % cfg.restart_dead_codes_every == 0 and step < cfg.steps:
            dead = (usage == 0).nonzero().flatten()
            if len(dead):
                # Restart unused codes at random latents of this batch, so the codebook stays in use.
                pool = stats["latents"].permute(0, 1, 3, 4, 2).reshape(-1, cfg.embed_dim)
                pick = torch.randint(len(pool), (len(dead),), generator=torch.Generator().manual_seed(step))
                with torch.no_grad():
                    tokenizer.vq.quantize.embedding.weight[dead] = pool[pick]
            usage.zero_()
        history.append({"step": step, "loss": stats["loss"], "psnr": stats["psnr"]})
        if step % 10 == 0 or step == cfg.steps:
            log(f"vq step {step}/{cfg.steps} loss {stats['loss']:.4f} psnr {stats['psnr']:.2f} dB "
                f"({time.time() - start:.0f}s)")
    tokenizer.eval()
    tokenizer.save_pretrained(out_dir)
    with torch.no_grad():
        eval_batch = clips[: min(64, len(clips))]
        _, stats = tokenizer.training_loss(eval_batch, cfg.commitment)
    used = int(torch.unique(stats["codes"]).numel())
    summary = {"clips": len(clips), "steps": cfg.steps, "final_loss": history[-1]["loss"],
               "psnr": stats["psnr"], "codes_used_on_eval": used, "codebook_size": cfg.codebook_size,
               "seconds": round(time.time() - start, 1), "skipped": skipped.as_dict(), "config": asdict(cfg)}
    (out_dir / "loom_vq_train.json").write_text(json.dumps(summary, indent=2))
    return summary
