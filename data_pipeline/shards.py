"""Webdataset tar shards: atomic writing and a reader that names the file and sample at fault.

A shard is written under a temporary name and renamed when complete, so a failed job never leaves
a half-written shard that a later stage would take for a whole one.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds


class ShardError(RuntimeError):
    """A shard that cannot be read at all (missing, not a tar, truncated)."""


class ShardWriter:
    """Writes samples to `{prefix}-{index:05d}.tar`, at most `max_count` samples per shard, or all
    samples to one `{prefix}.tar` when `max_count` is None."""

    def __init__(self, out_dir: str | Path, prefix: str, max_count: int | None = 1000):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_count = prefix, max_count
        self.shard_index, self.count_in_shard = -1, 0
        self.written: list[Path] = []
        self._tar = None
        self._stream = None

    def _open_next(self) -> None:
        self._close_current()
        self.shard_index += 1
        name = self.prefix if self.max_count is None else f"{self.prefix}-{self.shard_index:05d}"
        final = self.out_dir / f"{name}.tar"
        self._tmp = final.with_suffix(".tar.tmp")
        self._final = final
        self._stream = open(self._tmp, "wb")
        self._tar = wds.TarWriter(self._stream, mtime=0.0)
        self.count_in_shard = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._stream.close()
        os.replace(self._tmp, self._final)
        self.written.append(self._final)
        self._tar = None

    def write(self, sample: dict) -> None:
        """`sample` maps `__key__` and extensions (e.g. `json`, `img0.png`) to bytes, str or dicts."""
        if self._tar is None or (self.max_count is not None and self.count_in_shard >= self.max_count):
            self._open_next()
        self._tar.write(sample)
        self.count_in_shard += 1

    def close(self) -> list[Path]:
        self._close_current()
        return self.written

    def abort(self) -> None:
        """Drop the shard in progress; shards already completed stay."""
        if self._tar is not None:
            self._tar.close()
            self._stream.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.abort() if exc_type else self.close()


def list_shards(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ShardError(f"data directory not found: {directory}")
    shards = sorted(directory.glob("*.tar"))
    if not shards:
        raise ShardError(f"no .tar shards in {directory}")
    return shards


def iter_samples(shard: str | Path) -> Iterator[dict]:
    """Yield samples `{"__key__": key, "__shard__": path, ext: bytes}`, grouping members by key.

    Raises ShardError naming the shard when it cannot be opened or is cut off; samples yielded
    before the damage are still delivered.
    """
    shard = Path(shard)
    try:
        tar = tarfile.open(shard, "r|")
    except (OSError, tarfile.TarError) as e:
        raise ShardError(f"{shard}: not a readable tar shard ({e})") from None
    current: dict | None = None
    try:
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = os.path.basename(member.name)
                key, _, ext = name.partition(".")
                data = tar.extractfile(member).read()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": str(shard)}
                current[ext] = data
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ShardError(f"{shard}: truncated or corrupt tar after sample "
                         f"{current['__key__'] if current else '(none)'} ({e})") from None
    if current is not None:
        yield current


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: invalid JSON ({e})") from None


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def npy_bytes(array) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes):
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)


def index_shard(shard: str | Path) -> tuple[list[dict], str | None]:
    """Byte ranges of every sample's members, for random access: ([{"__key__", ext: (offset, size)}], error).

    Reads only the tar headers. A shard cut off or corrupt part-way returns the complete samples
    before the damage and the error message naming the shard.
    """
    shard = Path(shard)
    samples: list[dict] = []
    error = None
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = os.path.basename(member.name).partition(".")
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = (member.offset_data, member.size)
    except (OSError, tarfile.TarError, EOFError) as e:
        samples = samples[:-1]  # the sample being read when the damage was found may be incomplete
        error = f"{shard}: truncated or corrupt tar after {len(samples)} samples ({e})"
    size = shard.stat().st_size
    for i, sample in enumerate(samples):
        if any(span[0] + span[1] > size for ext, span in sample.items() if not ext.startswith("__")):
            samples = samples[:i]
            error = f"{shard}: truncated after {i} samples"
            break
    return samples, error


def read_members(shard: str | Path, entry: dict, handle=None) -> dict:
    """The bytes of one indexed sample's members (an open binary `handle` of the shard may be given)."""
    f = handle or open(shard, "rb")
    try:
        out = {"__key__": entry["__key__"], "__shard__": str(shard)}
        for ext, span in entry.items():
            if ext.startswith("__"):
                continue
            offset, size = span
            f.seek(offset)
            out[ext] = f.read(size)
            if len(out[ext]) != size:
                raise ShardError(f"{shard}: sample {entry['__key__']} member {ext} is cut off")
        return out
    finally:
        if handle is None:
            f.close()
