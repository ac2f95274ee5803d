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

The scale kind (VAR, Tian et al. 2024) keeps the encoder, decoder and one codebook but quantizes a
latent frame (C, h, w) as K token maps of growing sides (config `loom_scale_maps`, e.g. 1,2,3,4,6,8):
map k is the nearest codes to the residual left by maps < k, area-downsampled to its side; its codes'
vectors, upsampled back to (h, w) (bicubic), add up to the quantized latent. Decoding the first k maps
gives a coarser image, so each map refines the ones before it. transformers loads such a directory as
an Emu3VQVAE, but its own `encode`/`decode` know one map only.
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

from .next_scale import map_sides
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
    """Encode pixels to codes and decode codes to pixels; also the VQ training loss.

    Codes are one map (B, t, h, w) for the token kind, and a list of K maps [(B, t, h_k, w_k)], coarse to
    fine, for the scale kind."""

    kind = "token"  # "scale" for a multi-scale residual quantizer (set per instance)

    def __init__(self, vq: Emu3VQVAE, l2_codes: bool = False):
        super().__init__()
        self.vq = vq
        self.l2_codes = l2_codes
        self.temporal = vq.config.temporal_downsample_factor
        self.spatial = 2 ** (len(vq.config.channel_multiplier) - 1)
        self.scale_maps = list(getattr(vq.config, "loom_scale_maps", None) or [])
        self.kind = "scale" if self.scale_maps else "token"
        if self.scale_maps and l2_codes:
            raise ValueError("a multi-scale residual quantizer needs Euclidean codes: residuals shrink, unit codes "
                             "cannot fit them (set codebook.l2_normalize=false)")

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

    def map_shapes(self, h: int, w: int) -> list[tuple[int, int]]:
        """(h_k, w_k) of each token map of an h x w latent frame, coarse to fine; the last is (h, w)."""
        return list(zip(map_sides(self.scale_maps, h), map_sides(self.scale_maps, w)))

    def quantize_maps(self, z: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Multi-scale residual quantization of latents (B, t, C, h, w) (VAR's `VectorQuantizer2`): codes per map
        [(B, t, h_k, w_k)], each map's code vectors upsampled to the frame [(B*t, C, h, w)] (differentiable in
        the codebook; their sum is the quantized latent) and the residual each map was fit to [(B*t, C, h_k, w_k)]."""
        b, t, _, h, w = z.shape
        rest = z.detach().flatten(0, 1).float()                            # (N, C, h, w)
        codes, ups, residuals = [], [], []
        for hk, wk in self.map_shapes(h, w):
            target = rest if (hk, wk) == (h, w) else F.interpolate(rest, size=(hk, wk), mode="area")
            idx = self.nearest_codes(target[:, None])[:, 0]                # (N, h_k, w_k)
            up = self.upsample(self.embed_codes(idx[:, None])[:, 0].float(), h, w)
            codes.append(idx.view(b, t, hk, wk))
            ups.append(up)
            residuals.append(target)
            rest = rest - up.detach()
        return codes, ups, residuals

    @staticmethod
    def upsample(vectors: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Code vectors (N, C, h_k, w_k) -> (N, C, h, w), bicubic as VAR."""
        return vectors if vectors.shape[-2:] == (h, w) else F.interpolate(vectors, size=(h, w), mode="bicubic")

    def embed_maps(self, codes: list[torch.Tensor], upto: int | None = None) -> torch.Tensor:
        """The first `upto` (default all) maps of [(B, t, h_k, w_k)] -> the quantized latent (B, t, C, h, w);
        the frame size is the last map's."""
        b, t, h, w = codes[-1].shape
        total = sum(self.upsample(self.embed_codes(c.flatten(0, 1)[:, None])[:, 0], h, w) for c in codes[:upto])
        return total.unflatten(0, (b, t))

    def flat_codes(self, codes) -> torch.Tensor:
        """Every code of one map or of a list of maps, as a 1-D tensor (usage statistics)."""
        return torch.cat([c.flatten() for c in codes]) if self.scale_maps else codes.flatten()

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
    def encode(self, pixels: torch.Tensor):
        """(B, T, 3, H, W) in [-1, 1] -> codes (B, T/4 or 1, H/8, W/8), or the scale kind's maps of that frame
        size. Eval mode: BatchNorm must not move."""
        z = self.normalize(self.latents(pixels))
        return self.quantize_maps(z)[0] if self.scale_maps else self.nearest_codes(z)

    @torch.no_grad()
    def decode(self, codes, image: bool = False, upto: int | None = None) -> torch.Tensor:
        """codes (B, t, h, w), or the scale kind's maps (of which the first `upto`) -> pixels (B, 4t, 3, 8h, 8w)
        (or one frame for an image) in [-1, 1]."""
        quant = self.embed_maps(codes, upto) if self.scale_maps else self.embed_codes(codes)
        return self.decode_quantized(quant, image).clamp(-1, 1)

    def _numpy(self, codes, index):
        """`codes[index]` (of each map) as numpy."""
        return [c[index].cpu().numpy() for c in codes] if self.scale_maps else codes[index].cpu().numpy()

    def _tensor(self, codes, index):
        """numpy codes (of each map) as long tensors on the codebook's device, indexed by `index` (adds batch axes)."""
        as_long = lambda c: torch.as_tensor(c, dtype=torch.long, device=self.device)[index]  # noqa: E731
        return [as_long(c) for c in codes] if self.scale_maps else as_long(codes)

    def encode_images(self, rgb: np.ndarray) -> list:
        """(B, H, W, 3) uint8 images of one size -> per image its codes (H/8, W/8), or its maps [(h_k, w_k)]."""
        codes = self.encode(to_pixels(rgb)[:, None].to(self.device))
        return [self._numpy(codes, (i, 0)) for i in range(len(rgb))]

    def encode_image(self, rgb: np.ndarray):
        """(H, W, 3) uint8 -> codes (H/8, W/8), or maps [(h_k, w_k)]."""
        return self.encode_images(rgb[None])[0]

    def encode_video(self, frames: np.ndarray):
        """(T, H, W, 3) uint8, T a multiple of 4 -> codes (T/4, H/8, W/8), or maps [(T/4, h_k, w_k)]."""
        if len(frames) % self.temporal:
            raise ValueError(f"a clip needs a multiple of {self.temporal} frames, got {len(frames)}")
        return self._numpy(self.encode(to_pixels(frames)[None].to(self.device)), 0)

    def decode_image(self, codes, upto: int | None = None) -> np.ndarray:
        """codes (h, w), or maps [(h_k, w_k)] (of which the first `upto`) -> (8h, 8w, 3) uint8."""
        pixels = self.decode(self._tensor(codes, (None, None)), image=True, upto=upto)
        return to_uint8(pixels[0])[0]

    def decode_video(self, codes) -> np.ndarray:
        """codes (t, h, w), or maps [(t, h_k, w_k)] -> (4t, 8h, 8w, 3) uint8."""
        return to_uint8(self.decode(self._tensor(codes, None))[0])

    # ------------------------------------------------------------------ training
    def training_loss(self, pixels: torch.Tensor, commitment: float, codebook_loss: bool = True
                      ) -> tuple[torch.Tensor, dict]:
        """VQ-VAE loss on a clip batch (B, T, 3, H, W), T == 1 for images: L1 + L2 reconstruction,
        commitment, and (unless the codebook is updated by EMA) the codebook loss. The scale kind takes the
        last two as VAR does: the mean over maps of those of the running sum of maps. Statistics: every code
        (1-D) and the vector each was fit to (N, C), for usage, restarts and EMA."""
        z = self.normalize(self.latents(pixels).float())                   # (B, t, C, h, w)
        if self.scale_maps:
            codes, ups, residuals = self.quantize_maps(z)
            flat_z, quant, commit, fit = z.flatten(0, 1), 0, 0, 0
            for up in ups:
                quant = quant + up                                         # (B*t, C, h, w)
                commit = commit + F.mse_loss(flat_z, quant.detach()) / len(ups)
                fit = fit + F.mse_loss(quant, flat_z.detach()) / len(ups)
            quant = quant.unflatten(0, z.shape[:2])
            vectors = torch.cat([r.permute(0, 2, 3, 1).reshape(-1, r.shape[1]) for r in residuals])
        else:
            codes = self.nearest_codes(z)
            quant = self.embed_codes(codes).float()
            commit, fit = F.mse_loss(z, quant.detach()), F.mse_loss(quant, z.detach())
            vectors = z.detach().permute(0, 1, 3, 4, 2).reshape(-1, z.shape[2])
        quant_st = z + (quant - z).detach()                                # straight-through estimator
        recon = self.decode_quantized(quant_st, image=pixels.shape[1] == 1).float()
        target = pixels.float()
        mse = F.mse_loss(recon, target)
        recon_loss = F.l1_loss(recon, target) + mse
        loss = recon_loss + commitment * commit
        if codebook_loss:
            loss = loss + fit
        return loss, {"loss": loss.detach(), "recon": recon_loss.detach(), "mse": mse.detach(),
                      "codes": self.flat_codes(codes), "vectors": vectors}
