"""Image and video bytes <-> uint8 RGB arrays (Pillow for images, PyAV for video)."""

from __future__ import annotations

import io

import av
import numpy as np
from PIL import Image


class MediaError(ValueError):
    """Media bytes that cannot be decoded into what was asked for."""


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, size: int | None = None) -> np.ndarray:
    """Bytes of any Pillow format -> (H, W, 3) uint8; grayscale, palette, CMYK and alpha become RGB.

    With `size`, the image is resized to size x size (the shapes world is square).
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise MediaError(f"cannot decode image ({e})") from None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGB", img.size, (255, 255, 255))
        img = img.convert("RGBA")
        background.paste(img, mask=img.split()[-1])
        img = background
    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
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


def decode_video(data: bytes, num_frames: int, size: int | None = None) -> np.ndarray:
    """Video bytes -> (num_frames, H, W, 3) uint8, sampled uniformly over the whole clip."""
    try:
        with av.open(io.BytesIO(data)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as e:
        raise MediaError(f"cannot decode video ({e})") from None
    if not frames:
        raise MediaError("video has no frames")
    index = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    picked = [frames[i] for i in index]
    if size is not None:
        picked = [np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in picked]
    return np.stack(picked).astype(np.uint8)
