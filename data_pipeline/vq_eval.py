"""Measuring a visual tokenizer: PSNR, SSIM, codebook usage and perplexity, tokens per image and
per second of video (`loom data visual-tokenizer eval CKPT --data SHARDS`)."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from .media import Geometry, MediaError, decode_image, read_video
from .raw import SkipCounter
from .sources import iter_documents
from .visual_tokenizer import VisualTokenizer, psnr, to_pixels


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM per image of (N, 3, H, W) pixels in [-1, 1]: 11x11 Gaussian window (sigma 1.5, smaller for
    tiny images), constants of Wang et al. 2004 on the [0, 1] range, averaged over channels."""
    a, b = (a.float() + 1) / 2, (b.float() + 1) / 2
    size = min(11, a.shape[-1], a.shape[-2]) // 2 * 2 - 1
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-x ** 2 / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(a.shape[1], 1, size, size)

    def blur(t):
        return F.conv2d(t, window, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(1)


def code_statistics(histogram: torch.Tensor) -> dict:
    """Usage (fraction of codes used at least once) and perplexity (exp of the code entropy)."""
    total = histogram.sum().item()
    p = histogram.double() / max(total, 1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"codes_used": int((histogram > 0).sum()), "usage": float((histogram > 0).float().mean()),
            "perplexity": math.exp(entropy)}


class Reconstructions:
    """Accumulates per-kind PSNR/SSIM and the code histogram over batches of clips."""

    def __init__(self, codebook_size: int):
        self.histogram = torch.zeros(codebook_size, dtype=torch.long)
        self.sums = defaultdict(float)
        self.counts = defaultdict(int)
        self.psnr_by_maps: dict[int, float] = defaultdict(float)  # the scale kind: PSNR decoding the first k maps

    @torch.no_grad()
    def add(self, tokenizer: VisualTokenizer, pixels: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels (B, T, 3, H, W), T == 1 for images; returns codes and reconstructions."""
        device = tokenizer.codebook.device
        codes = tokenizer.encode(pixels.to(device))
        image = pixels.shape[1] == 1
        recon = tokenizer.decode(codes, image).float().cpu()
        pixels = pixels.float()
        self.histogram += torch.bincount(tokenizer.flat_codes(codes).cpu(), minlength=len(self.histogram))
        frames_a, frames_b = pixels.flatten(0, 1), recon.flatten(0, 1)

        def clip_psnr(recon_frames):
            mse = (frames_a - recon_frames).pow(2).flatten(1).mean(1).view(pixels.shape[0], -1).mean(1)
            return sum(psnr(m) for m in mse.tolist())

        full = clip_psnr(frames_b)
        self.sums[f"psnr_{kind}"] += full
        for k in range(1, len(tokenizer.scale_maps)):
            self.psnr_by_maps[k] += clip_psnr(tokenizer.decode(codes, image, upto=k).float().cpu().flatten(0, 1))
        if tokenizer.scale_maps:
            self.psnr_by_maps[len(tokenizer.scale_maps)] += full
        # the baseline a tokenizer must beat to carry more than colour averages: each frame as its mean colour
        flat = frames_a.mean((2, 3), keepdim=True)
        flat_mse = (frames_a - flat).pow(2).flatten(1).mean(1).view(pixels.shape[0], -1).mean(1)
        self.sums[f"flat_psnr_{kind}"] += sum(psnr(m) for m in flat_mse.tolist())
        self.sums[f"ssim_{kind}"] += ssim(frames_a, frames_b).view(pixels.shape[0], -1).mean(1).sum().item()
        self.counts[kind] += pixels.shape[0]
        return codes, recon

    def result(self) -> dict:
        out = {}
        for key, total in self.sums.items():
            kind = key.removeprefix("flat_").split("_", 1)[1]
            out[key] = total / self.counts[kind]
        for metric in ("psnr", "ssim", "flat_psnr"):
            n = sum(self.counts.values())
            out[metric] = sum(self.sums[f"{metric}_{k}"] for k in self.counts) / max(n, 1)
        n = sum(self.counts.values())
        out.update({f"psnr_maps_{k}": total / n for k, total in sorted(self.psnr_by_maps.items())})
        return {**out, **code_statistics(self.histogram), "clips": dict(self.counts)}


def grid_tokens(h: int, w: int, map_shapes: list[tuple[int, int]] = ()) -> int:
    """Sequence tokens of one h x w frame in the sequence format (rows + eol each, then eof; DESIGN §2), or, for
    the scale kind, of its maps (a marker before each, then eof)."""
    if map_shapes:
        return sum(a * b + 1 for a, b in map_shapes) + 1
    return h * (w + 1) + 1


def evaluate_shards(tokenizer: VisualTokenizer, raw_dirs: list[str | Path], geometry: Geometry, video_frames: int,
                    max_images: int, max_videos: int, batch_size: int = 16, log=print) -> dict:
    """Reconstruct the images and videos of raw shards; PSNR/SSIM per pixel (mean over clips; a clip
    averages its frames), codebook statistics, tokens per image and per second of video."""
    tokenizer.eval()
    skipped, acc = SkipCounter(), Reconstructions(tokenizer.codebook_size)
    pending: dict[tuple, list] = defaultdict(list)
    image_codes = image_tokens = video_codes = video_seconds = 0
    images = videos = 0
    start = time.time()

    def flush(key):
        nonlocal image_codes, image_tokens, video_codes
        pixels = torch.stack(pending[key])
        codes, _ = acc.add(tokenizer, pixels, "image" if key[0] == 1 else "video")
        h, w = (codes[-1] if tokenizer.scale_maps else codes).shape[-2:]
        if key[0] == 1:
            image_codes += tokenizer.flat_codes(codes).numel()
            image_tokens += len(pixels) * grid_tokens(h, w, tokenizer.map_shapes(h, w) if tokenizer.scale_maps else ())
        else:
            video_codes += tokenizer.flat_codes(codes).numel()
        pending[key].clear()

    for where, segments in iter_documents(raw_dirs, skipped):
        for seg in segments:
            try:
                if seg.kind == "image" and images < max_images:
                    pixels = to_pixels(decode_image(seg.data, geometry)[None])
                    images += 1
                elif seg.kind == "video" and videos < max_videos:
                    video = read_video(seg.data, video_frames, geometry)
                    pixels = to_pixels(video.frames)
                    videos += 1
                    video_seconds += video.seconds
                else:
                    continue
            except MediaError as e:
                skipped.add(e.reason, f"{where}: {e}")
                continue
            key = tuple(pixels.shape)
            pending[key].append(pixels)
            if len(pending[key]) == batch_size:
                flush(key)
        if images >= max_images and videos >= max_videos:
            break
        if (images + videos) % 200 == 0 and images + videos:
            log(f"vq eval: {images} images, {videos} videos ({time.time() - start:.0f}s)")
    for key in [k for k, v in pending.items() if v]:
        flush(key)
    result = acc.result()
    result.update({
        "images": images, "videos": videos, "codebook_size": tokenizer.codebook_size,
        "codes_per_image": image_codes / images if images else None,
        "grid_tokens_per_image": image_tokens / images if images else None,
        "codes_per_video_second": video_codes / video_seconds if video_seconds else None,
        "skipped": skipped.as_dict(), "seconds": round(time.time() - start, 1)})
    return result
