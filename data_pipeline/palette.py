"""The pixel visual kind (ImageGPT): every pixel of a small image is one token, its nearest palette colour.

The palette is P RGB colours from k-means over the training images' pixels (ImageGPT clusters RGB into 512, a
9-bit palette). Encoding is a nearest-colour lookup, decoding a table lookup: no network, so an image whose colours
are all in the palette round-trips exactly. The interface is the VQ's (`VisualTokenizer`: encode_images,
encode_video, decode_image, decode_video, spatial and temporal factors), so tokenizing, generation and evaluation
take either. A palette directory holds `palette.safetensors` (the (P, 3) uint8 colours, hashed into the vocabulary
fingerprint like VQ weights) and `config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .media import Geometry, MediaError, decode_image
from .raw import SkipCounter
from .sources import iter_documents

PALETTE_FILE = "palette.safetensors"
CHUNK = 1 << 16  # pixels per distance matrix: 64k x P floats at a time


def nearest(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N, 3) and (P, 3) float -> (N,) index of the nearest centre (squared RGB distance; ties: the lowest)."""
    return torch.cat([torch.cdist(points[i:i + CHUNK], centres).argmin(1) for i in range(0, len(points), CHUNK)])


def image_pixels(raw_dirs: list[str | Path], size: int, max_images: int) -> tuple[np.ndarray, int, SkipCounter]:
    """The RGB pixels (N, 3) of the first `max_images` images of raw shards, each cropped and resized to size x size
    (the pixel kind's grid), the images read, and the unreadable ones, counted by reason."""
    skipped, pixels, geometry = SkipCounter(), [], Geometry(size=size, multiple=1)
    for where, segments in iter_documents(raw_dirs, skipped):
        for seg in segments:
            if seg.kind != "image" or len(pixels) >= max_images:
                continue
            try:
                pixels.append(decode_image(seg.data, geometry).reshape(-1, 3))
            except MediaError as e:
                skipped.add(e.reason, f"{where}: {e}")
        if len(pixels) >= max_images:
            break
    if not pixels:
        raise ValueError(f"no readable image in {', '.join(map(str, raw_dirs))}")
    return np.concatenate(pixels), len(pixels), skipped


def train_palette(pixels: np.ndarray, size: int, iterations: int = 30, seed: int = 0) -> tuple[np.ndarray, dict]:
    """k-means over uint8 RGB pixels (any shape ending in 3) -> the (size, 3) uint8 palette and a summary.

    Runs on the distinct colours weighted by their counts (images have far fewer colours than pixels), from a
    k-means++ start. With no more distinct colours than `size` the palette is those colours exactly (the rest
    of the table repeats the first, which encoding never picks over it)."""
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    if len(colours) <= size:
        palette = np.concatenate([colours, np.repeat(colours[:1], size - len(colours), 0)]).astype(np.uint8)
        return palette, {"colours": len(colours), "iterations": 0, "rmse": 0.0}
    x, w = torch.from_numpy(colours).float(), torch.from_numpy(counts).double()
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.multinomial(w, 1, generator=g)]                            # k-means++: (1, 3)
    d2 = torch.cdist(x, centres).squeeze(1).double() ** 2                        # (U,) to the nearest centre
    for _ in range(size - 1):
        pick = x[torch.multinomial(w * d2 + 1e-12, 1, generator=g)]
        centres = torch.cat([centres, pick])
        d2 = torch.minimum(d2, ((x - pick) ** 2).sum(1).double())
    for step in range(iterations):
        assign = nearest(x, centres)                                             # (U,)
        mass = torch.zeros(size, dtype=torch.float64).index_add_(0, assign, w)
        sums = torch.zeros(size, 3, dtype=torch.float64).index_add_(0, assign, x.double() * w[:, None])
        moved = torch.where(mass[:, None] > 0, sums / mass.clamp(min=1e-12)[:, None], centres.double()).float()
        if torch.equal(moved, centres):
            break
        centres = moved
    palette = centres.round().clamp(0, 255).to(torch.uint8)
    error = ((x - palette.float()[nearest(x, palette.float())]) ** 2).sum(1).double()
    rmse = float(((error * w).sum() / w.sum() / 3).sqrt())
    return palette.numpy(), {"colours": len(colours), "iterations": step + 1, "rmse": rmse}


class PaletteTokenizer:
    """Pixels <-> palette indices; the same calls as `VisualTokenizer`, with spatial and temporal factors 1."""

    kind = "pixel"
    scale_maps = ()  # one map per frame, as the token kind
    spatial = 1
    temporal = 1
    device = torch.device("cpu")  # a table lookup: the CPU is enough

    def __init__(self, palette: np.ndarray):
        self.palette = torch.as_tensor(np.asarray(palette, dtype=np.uint8))      # (P, 3)
        self.centres = self.palette.float()

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "PaletteTokenizer":
        path = Path(directory) / PALETTE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: not a palette directory (no {PALETTE_FILE})")
        return cls(load_file(str(path))["palette"].numpy())

    def save_pretrained(self, directory: str | Path, summary: dict | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"palette": self.palette.contiguous()}, str(directory / PALETTE_FILE))
        config = {"model_type": "loom_palette", "visual_kind": self.kind, "palette_size": self.codebook_size}
        (directory / "config.json").write_text(json.dumps({**config, **(summary or {})}, indent=2) + "\n")

    @property
    def codebook_size(self) -> int:
        return len(self.palette)

    def to(self, device) -> "PaletteTokenizer":
        return self

    def eval(self) -> "PaletteTokenizer":
        return self

    def encode_images(self, rgb: np.ndarray) -> np.ndarray:
        """(..., H, W, 3) uint8 -> indices (..., H, W)."""
        rgb = np.asarray(rgb)
        flat = torch.from_numpy(rgb.reshape(-1, 3)).float()
        return nearest(flat, self.centres).view(rgb.shape[:-1]).numpy()

    def encode_image(self, rgb: np.ndarray) -> np.ndarray:
        return self.encode_images(rgb)

    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        """(T, H, W, 3) uint8 -> (T, H, W): frame by frame, no temporal compression."""
        return self.encode_images(frames)

    def decode_image(self, codes: np.ndarray) -> np.ndarray:
        """indices (..., h, w) -> (..., h, w, 3) uint8."""
        return self.palette[torch.as_tensor(np.asarray(codes), dtype=torch.long)].numpy()

    def decode_video(self, codes: np.ndarray) -> np.ndarray:
        return self.decode_image(codes)
