"""Image and video bytes <-> uint8 RGB arrays (Pillow for images, PyAV for video).

`Geometry` says what size a decoded image or video frame gets and which inputs are refused.
Every refusal is a MediaError whose `reason` callers count (docs/visual_tokenizer.md and docs/data.md: bad input).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import av
import numpy as np
from PIL import Image


class MediaError(ValueError):
    """Media bytes that cannot be decoded into what was asked for; `reason` is the counter's key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Geometry:
    """How decoded pixels are sized, and the limits that make an input a skip."""
    mode: str = field(default="crop", metadata={"doc": (
        "'crop': resize the shorter side to `size`, then center-crop size x size. 'budget': keep the aspect "
        "ratio, shrink until h*w <= max_pixels, round each side down to a multiple of `multiple` (the token "
        "grid h x w then varies from image to image, as Emu3's does).")})
    size: int = field(default=32, metadata={"doc": "Side of the square output in 'crop' mode."})
    max_pixels: int = field(default=64 * 64, metadata={"doc": "Pixel budget of the output in 'budget' mode."})
    multiple: int = field(default=8, metadata={"doc": "Output sides are multiples of this (the VQ's downsampling)."})
    min_side: int = field(default=8, metadata={"doc": "Sources whose shorter side is below this are skipped."})
    max_source_pixels: int = field(default=50_000_000, metadata={
        "doc": "Sources over this many pixels are skipped before their pixels are decoded."})
    max_aspect: float = field(default=8.0, metadata={
        "doc": "Sources whose long side is over this many times the short side are skipped."})

    def __post_init__(self):
        if self.mode not in ("crop", "budget"):
            raise ValueError(f"geometry mode '{self.mode}' is unknown; use 'crop' or 'budget'")
        if self.mode == "crop" and self.size % self.multiple:
            raise ValueError(f"geometry size {self.size} must be a multiple of {self.multiple} (the VQ's downsampling)")
        if self.mode == "budget" and self.max_pixels < self.multiple ** 2:
            raise ValueError(f"geometry max_pixels {self.max_pixels} is below one token ({self.multiple}^2 pixels)")

    def check(self, width: int, height: int, what: str) -> None:
        """Raise MediaError if a `width` x `height` source is refused."""
        if width * height > self.max_source_pixels:
            raise MediaError(f"{what}_too_large", f"{what} is {width}x{height}, over {self.max_source_pixels} pixels")
        if min(width, height) < self.min_side:
            raise MediaError(f"{what}_too_small", f"{what} is {width}x{height}, under {self.min_side} pixels a side")
        if max(width, height) > self.max_aspect * min(width, height):
            raise MediaError(f"{what}_aspect_ratio", f"{what} is {width}x{height}, an aspect ratio over "
                                                     f"{self.max_aspect:g}")

    def target(self, width: int, height: int) -> tuple[int, int]:
        """Output (width, height) for a source of that size."""
        if self.mode == "crop":
            return self.size, self.size
        scale = min(1.0, (self.max_pixels / (width * height)) ** 0.5)
        w = max(self.multiple, int(width * scale) // self.multiple * self.multiple)
        h = max(self.multiple, int(height * scale) // self.multiple * self.multiple)
        return w, h

    def scaled_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the source is scaled to before any crop (at least the output size on each side)."""
        if self.mode == "budget":
            return self.target(width, height)
        scale = self.size / min(width, height)
        return max(self.size, math.ceil(width * scale)), max(self.size, math.ceil(height * scale))

    def apply(self, img: Image.Image) -> Image.Image:
        w, h = self.target(*img.size)
        if img.size == (w, h):
            return img
        if self.mode == "budget":
            return img.resize((w, h), Image.BICUBIC)
        # resize only the centered square that the crop keeps (cheaper than resizing, then cropping)
        side = min(img.size)
        left, top = (img.size[0] - side) / 2, (img.size[1] - side) / 2
        return img.resize((w, h), Image.BICUBIC, box=(left, top, left + side, top + side))


def as_geometry(geometry: Geometry | int | None) -> Geometry | None:
    """An int is the crop size (a square image of that size)."""
    return Geometry(size=geometry) if isinstance(geometry, int) else geometry


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK become RGB; transparency is composed over white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGB", img.size, (255, 255, 255))
        img = img.convert("RGBA")
        background.paste(img, mask=img.split()[-1])
        return background
    return img.convert("RGB")


def decode_image(data: bytes, geometry: Geometry | int | None = None) -> np.ndarray:
    """Bytes of any Pillow format -> (H, W, 3) uint8, sized by `geometry` (None: as stored)."""
    geometry = as_geometry(geometry)
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:
        raise MediaError("bad_image", f"cannot decode image ({e})") from None
    if geometry is not None:
        geometry.check(*img.size, "image")  # from the header, before the pixels are decoded
        if img.format == "JPEG":
            img.draft("RGB", geometry.scaled_size(*img.size))  # decode at 1/2, 1/4 or 1/8 scale when that suffices
    try:
        img.load()
        img = to_rgb(img)
    except Exception as e:
        raise MediaError("bad_image", f"cannot decode image ({e})") from None
    if geometry is not None:
        img = geometry.apply(img)
    return np.asarray(img, dtype=np.uint8)


def encode_mp4(frames: np.ndarray, fps: int = 8) -> bytes:
    """(T, H, W, 3) uint8 -> mp4 bytes (MPEG-4 part 2, single-threaded so the bytes are deterministic)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 400_000
        stream.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@dataclass
class Video:
    frames: np.ndarray   # (T, H, W, 3) uint8
    seconds: float       # duration of the source clip


def read_video(data: bytes, num_frames: int, geometry: Geometry | int | None = None) -> Video:
    """Video bytes of any length and fps -> `num_frames` frames sampled uniformly over the clip."""
    geometry = as_geometry(geometry)
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaError("video_no_frames", "video has no video stream")
            stream = container.streams.video[0]
            frames = [f.to_image() for f in container.decode(video=0)]
            rate = float(stream.average_rate or stream.base_rate or 0) or None
    except MediaError:
        raise
    except Exception as e:
        raise MediaError("bad_video", f"cannot decode video ({e})") from None
    if not frames:
        raise MediaError("video_no_frames", "video has no frames")
    seconds = len(frames) / rate if rate else float(len(frames))
    index = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    picked = [frames[i] for i in index]
    if geometry is not None:
        geometry.check(*picked[0].size, "video")
        picked = [geometry.apply(f) for f in picked]
    return Video(np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in picked]), seconds)


def decode_video(data: bytes, num_frames: int, geometry: Geometry | int | None = None) -> np.ndarray:
    """Video bytes -> (num_frames, H, W, 3) uint8, sampled uniformly over the whole clip."""
    return read_video(data, num_frames, geometry).frames
