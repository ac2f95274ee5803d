"""The visual tokenizer: transformers' Emu3VQVAE architecture with Loom's own training step.

DESIGN §3: Emu3VQVAE has no training forward and its `encode()` crops video codes wrongly, so Loom
calls the submodules directly: encoder -> quant_conv -> nearest code (straight-through) ->
post_quant_conv -> decoder. A clip of T frames (T a multiple of 4) gives T/4 latent frames. An
image is a clip of one still frame, which Emu3 repeats 4 times along time; the encoder's 2-D part
works frame by frame, so Loom runs it once and repeats its output (the same numbers, 4x less work),
and decodes only the first of the 4 output frames (the one an image is read from).

The weights are an HF `Emu3VQVAE` directory (config.json + safetensors): released Emu3 tokenizers
load, and what Loom trains loads in transformers. With l2-normalized codes the stored codebook has
unit rows, so transformers' Euclidean nearest-code lookup picks the same codes as Loom's cosine one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Emu3VQVAEConfig
from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

from .palette import PALETTE_FILE, PaletteTokenizer


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float in [-1, 1] (Emu3's normalisation)."""
    return torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    return pixels.float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()


def psnr(mse: float) -> float:
    """PSNR in dB of pixels in [-1, 1] (peak-to-peak range 2)."""
    return 10 * math.log10(4.0 / max(mse, 1e-10))


def load_emu3_vq(directory: Path) -> Emu3VQVAE:
    """An Emu3VQVAE directory, or the `vqmodel` inside an Emu3ForConditionalGeneration directory."""
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: not an Emu3VQVAE or Emu3 directory (no config.json)")
    config = json.loads((directory / "config.json").read_text())
    if config.get("model_type") != "emu3":
        return Emu3VQVAE.from_pretrained(directory)
    from safetensors import safe_open

    vq = Emu3VQVAE(Emu3VQVAEConfig(**config["vq_config"]))
    state = {}
    for file in sorted(directory.glob("*.safetensors")):  # read only the tokenizer's tensors
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                for prefix in ("model.vqmodel.", "vqmodel."):
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = f.get_tensor(key)
    missing, unexpected = vq.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory}: the Emu3 model's vqmodel does not match its vq_config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return vq


def load_visual_tokenizer(directory: str | Path) -> "VisualTokenizer | PaletteTokenizer":
    """The visual tokenizer of a directory: a palette (pixel kind) or an Emu3VQVAE (token kind), in eval mode."""
    if (Path(directory) / PALETTE_FILE).is_file():
        return PaletteTokenizer.from_pretrained(directory)
    return VisualTokenizer.from_pretrained(directory)


class VisualTokenizer(torch.nn.Module):
    """Encode pixels to codes and decode codes to pixels; also the VQ training loss."""

    kind = "token"

    def __init__(self, vq: Emu3VQVAE, l2_codes: bool = False):
        super().__init__()
        self.vq = vq
        self.l2_codes = l2_codes
        self.temporal = vq.config.temporal_downsample_factor
        self.spatial = 2 ** (len(vq.config.channel_multiplier) - 1)

    @classmethod
    def from_pretrained(cls, directory: str | Path, l2_codes: bool = False) -> "VisualTokenizer":
        return cls(load_emu3_vq(Path(directory)), l2_codes).eval()

    def save_pretrained(self, directory: str | Path) -> None:
        self.vq.save_pretrained(directory)

    @property
    def codebook_size(self) -> int:
        return self.vq.config.codebook_size

    @property
    def device(self) -> torch.device:
        return self.codebook.device

    @property
    def codebook(self) -> torch.Tensor:
        return self.vq.quantize.embedding.weight                            # (K, C)

    # ------------------------------------------------------------------ encoder
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> continuous latents (B, T/4, C, H/8, W/8); T == 1 is an image."""
        enc = self.vq.encoder
        b, t = pixels.shape[:2]
        if t != 1 and t % self.temporal:
            raise ValueError(f"a clip needs 1 (an image) or a multiple of {self.temporal} frames, got {t}")
        h = enc.conv_in(pixels.flatten(0, 1))                              # (B*T, c, H, W)
        h = enc.middle_block(enc.down_block(h))                            # (B*T, c', H/8, W/8)
        h = enc.norm_out(h)
        h = enc.conv_out(h * torch.sigmoid(h))                             # (B*T, C, h, w)
        h = h.unflatten(0, (b, t)).transpose(1, 2)                         # (B, C, T, h, w)
        if t == 1:
            h = h.expand(-1, -1, self.temporal, -1, -1)                    # the still, 4 times
        for conv in enc.time_conv:
            h = conv(h)
            h = h * torch.sigmoid(h)
        for layer in enc.time_res_stack:
            h = layer(h)                                                   # (B, C, T/4, h, w)
        return self.vq.quant_conv(h).transpose(1, 2)                       # (B, T/4, C, h, w)

    # ------------------------------------------------------------------ codebook
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, t, C, h, w) as compared with the codebook: unit length with l2 codes."""
        return F.normalize(z, dim=2) if self.l2_codes else z

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, t, C, h, w) -> code ids (B, t, h, w), by Euclidean distance as transformers does."""
        flat = z.detach().float().permute(0, 1, 3, 4, 2).reshape(-1, z.shape[2])   # (N, C)
        codebook = self.codebook.float()
        distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.T
        b, t, _, h, w = z.shape
        return distances.argmin(1).view(b, t, h, w)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, t, h, w) -> (B, t, C, h, w)."""
        return self.vq.quantize.embedding(codes).permute(0, 1, 4, 2, 3)

    @torch.no_grad()
    def project_codebook(self) -> None:
        """Keep l2 codes on the unit sphere (after every optimizer or EMA update)."""
        if self.l2_codes:
            self.codebook.copy_(F.normalize(self.codebook, dim=1))

    # ------------------------------------------------------------------ decoder
    def decode_quantized(self, quant: torch.Tensor, image: bool = False) -> torch.Tensor:
        """(B, t, C, h, w) -> pixels (B, 4t, 3, 8h, 8w), or (B, 1, 3, 8h, 8w) for an image."""
        dec = self.vq.decoder
        b = quant.shape[0]
        post = self.vq.post_quant_conv(quant.transpose(1, 2))              # (B, C', t, h, w)
        both = torch.cat((post, quant.transpose(1, 2)), dim=0)             # (2B, C', t, h, w)
        for layer in dec.time_res_stack:
            both = layer(both)
        for layer in dec.time_conv:
            both = layer(both)
            both = both * torch.sigmoid(both)                              # (2B, C', 4t, h, w)
        if image:
            both = both[:, :, :1]                                          # frames decode independently
        frames = both.shape[2]
        hidden, cond = (x.flatten(0, 1) for x in both.transpose(1, 2).chunk(2))  # (B*F, C', h, w) each
        x = dec.conv_in(hidden)
        x = dec.up_block(dec.middle_block(x, cond), cond)
        x = dec.norm_out(x, cond)
        x = dec.conv_out(x * torch.sigmoid(x))                             # (B*F, 3, 8h, 8w)
        return x.unflatten(0, (b, frames))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) in [-1, 1] -> codes (B, T/4 or 1, H/8, W/8). Eval mode: BatchNorm must not move."""
        return self.nearest_codes(self.normalize(self.latents(pixels)))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, image: bool = False) -> torch.Tensor:
        """codes (B, t, h, w) -> pixels (B, 4t, 3, 8h, 8w) (or one frame for an image) in [-1, 1]."""
        return self.decode_quantized(self.embed_codes(codes), image).clamp(-1, 1)

    def encode_images(self, rgb: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 images of one size -> codes (B, H/8, W/8)."""
        return self.encode(to_pixels(rgb)[:, None].to(self.codebook.device))[:, 0].cpu().numpy()

    def encode_image(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> codes (H/8, W/8)."""
        return self.encode_images(rgb[None])[0]

    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        """(T, H, W, 3) uint8, T a multiple of 4 -> codes (T/4, H/8, W/8)."""
        if len(frames) % self.temporal:
            raise ValueError(f"a clip needs a multiple of {self.temporal} frames, got {len(frames)}")
        return self.encode(to_pixels(frames)[None].to(self.codebook.device))[0].cpu().numpy()

    def decode_image(self, codes: np.ndarray) -> np.ndarray:
        """codes (h, w) -> (8h, 8w, 3) uint8."""
        pixels = self.decode(torch.as_tensor(codes, dtype=torch.long)[None, None], image=True)
        return to_uint8(pixels[0])[0]

    def decode_video(self, codes: np.ndarray) -> np.ndarray:
        """codes (t, h, w) -> (4t, 8h, 8w, 3) uint8."""
        return to_uint8(self.decode(torch.as_tensor(codes, dtype=torch.long)[None])[0])

    # ------------------------------------------------------------------ training
    def training_loss(self, pixels: torch.Tensor, commitment: float, codebook_loss: bool = True
                      ) -> tuple[torch.Tensor, dict]:
        """VQ-VAE loss on a clip batch (B, T, 3, H, W), T == 1 for images: L1 + L2 reconstruction,
        commitment, and (unless the codebook is updated by EMA) the codebook loss."""
        z = self.normalize(self.latents(pixels).float())                   # (B, t, C, h, w)
        codes = self.nearest_codes(z)
        quant = self.embed_codes(codes).float()
        commit = F.mse_loss(z, quant.detach())
        quant_st = z + (quant - z).detach()                                # straight-through estimator
        recon = self.decode_quantized(quant_st, image=pixels.shape[1] == 1).float()
        target = pixels.float()
        mse = F.mse_loss(recon, target)
        recon_loss = F.l1_loss(recon, target) + mse
        loss = recon_loss + commitment * commit
        if codebook_loss:
            loss = loss + F.mse_loss(quant, z.detach())
        return loss, {"loss": loss.detach(), "recon": recon_loss.detach(), "mse": mse.detach(),
                      "codes": codes, "latents": z.detach()}
