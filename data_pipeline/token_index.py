"""The index of a token shard: where each document's members lie, written once beside the shard.

`tokens-X.tar.idx.npy`, one row per document in stored order: its key and the (offset, size) of its
`tokens.npy` and `spans.json` members ((-1, 0) where a member is absent), about 100 bytes per document.
The tokenize job writes it with each shard, and the shard's document count and byte size into the
source's manifest (`shard_documents`, `shard_bytes`); `loom data index DIR` does both for shards written
before. The loader starts from the manifest's counts alone and memory-maps a shard's index only when a
stream first reads that shard, so start-up does not grow with the number of documents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .shards import ShardError, index_shard, read_json, write_json_atomic

MEMBERS = {"tokens": "tokens.npy", "spans": "spans.json"}  # index field -> member extension
SUFFIX = ".idx.npy"


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name + SUFFIX)


def build_index(shard: str | Path) -> tuple[np.ndarray, str | None]:
    """The index of `shard` from its tar headers, and the error of a damaged shard (its complete documents are
    indexed)."""
    entries, error = index_shard(shard)
    width = max([len(e["__key__"].encode()) for e in entries] + [1])
    index = np.zeros(len(entries), [("key", f"S{width}")] + [(field, "<i8", (2,)) for field in MEMBERS])
    for row, entry in zip(index, entries):
        row["key"] = entry["__key__"].encode()
        for field, member in MEMBERS.items():
            row[field] = entry.get(member, (-1, 0))
    return index, error


def save_index(shard: Path, index: np.ndarray) -> bool:
    """Write `index` beside `shard` (atomically); False where that folder is read-only."""
    target = index_path(shard)
    tmp = target.with_name(target.name + ".tmp.npy")
    try:
        np.save(tmp, index, allow_pickle=False)
        tmp.replace(target)
    except OSError:
        return False
    return True


def load_index(shard: Path) -> np.ndarray | None:
    """The memory-mapped index of `shard`, or None where there is none (or it cannot be read)."""
    try:
        return np.load(index_path(shard), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None


def index_fits(index: np.ndarray, shard_bytes: int) -> bool:
    """Whether every member `index` names lies inside a shard of `shard_bytes` (an index of an earlier, longer
    version of the shard does not)."""
    if len(index) == 0:
        return True
    last = index[-1]
    return all(int(last[field][0]) + int(last[field][1]) <= shard_bytes for field in MEMBERS)


def read_document(shard: Path, row, handle) -> dict:
    """The members of one indexed document, read from an open binary `handle` of the shard."""
    out = {"__key__": row["key"].decode(), "__shard__": str(shard)}
    for field, member in MEMBERS.items():
        offset, size = (int(v) for v in row[field])
        if offset < 0:
            continue
        handle.seek(offset)
        out[member] = handle.read(size)
        if len(out[member]) != size:
            raise ShardError(f"{shard}: sample {out['__key__']} member {member} is cut off")
    return out


def index_folder(folder: str | Path, log=print) -> dict:
    """Index every shard of a token-shard folder and record their document counts and sizes in its manifest:
    for shards written before the tokenize job did so. Returns the manifest."""
    folder = Path(folder)
    manifest = read_json(folder / "manifest.json")
    if "shards" not in manifest:
        raise ShardError(f"{folder / 'manifest.json'} lists no shards: point at one source's folder of token shards")
    counts, sizes = [], []
    for i, name in enumerate(manifest["shards"]):
        shard = folder / name
        index, error = build_index(shard)  # rebuilt: an index left from an earlier version of the shard is stale
        if error:
            raise ShardError(f"{error}: re-tokenize that input before indexing the folder")
        if not save_index(shard, index):
            raise ShardError(f"{folder} is not writable: its shard indexes cannot be written there")
        counts.append(len(index))
        sizes.append(shard.stat().st_size)
        if (i + 1) % 1000 == 0:
            log(f"indexed {i + 1}/{len(manifest['shards'])} shards")
    manifest.update(shard_documents=counts, shard_bytes=sizes)
    write_json_atomic(folder / "manifest.json", manifest)
    log(f"indexed {folder}: {len(counts)} shards, {sum(counts)} documents")
    return manifest
