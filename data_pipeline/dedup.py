"""Exact-duplicate removal across a source's input files, partitioned by hash value over the ranks.

Each rank hashes its own input files into `hashes/X.npz` (keys and 64-bit content hashes, in input
order). Rank r of W owns the hashes h with h % W == r: it reads the hash files one at a time, keeps
its own hashes with their global positions (input order), and writes the positions of the documents
whose hash appeared at an earlier position (`hashes/duplicates-r-of-W-<digest>.npy`). Every rank then
reads those W files, keeps the positions inside its own input files and drops those documents.
Memory per rank: one hash file plus 1/W of the source's hashes (and of its duplicates), never all of
them; the result does not depend on W: every document whose content appeared earlier in input order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .raw import SampleError
from .shards import ShardError
from .sources import content_hash, read_input
from .tokenize_config import TokenizeSource


def hash_file(source: TokenizeSource, path: Path, out: Path) -> Path:
    """`hashes/X.npz`: keys and content hashes of input X's readable documents, in input order."""
    target = out / "hashes" / f"{path.stem}.npz"
    if not target.exists():
        keys, hashes = [], []
        try:
            for item in read_input(source, path):
                if not isinstance(item, SampleError):
                    keys.append(item[0])
                    hashes.append(content_hash(item[1]))
        except ShardError:
            pass  # the tokenize pass reads the same documents and reports the damage
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{path.stem}.tmp.npz")
        np.savez(tmp, keys=np.array(keys, dtype=str), hashes=np.array(hashes, dtype=np.uint64))
        tmp.replace(target)
    return target


def partition_path(files: list[Path], rank: int, world: int) -> Path:
    """Named after the hash files it covers, so a file left by a run over other inputs is never read."""
    digest = hashlib.sha1("\n".join(f.name for f in files).encode()).hexdigest()[:12]
    return files[0].parent / f"duplicates-{rank}-of-{world}-{digest}.npy"


def write_partition(files: list[Path], rank: int, world: int) -> Path:
    """The global positions of the documents of hash partition `rank` whose hash appeared earlier."""
    hashes, positions, offset = [], [], 0
    for f in files:
        h = np.load(f)["hashes"]
        mine = np.flatnonzero(h % np.uint64(world) == rank)
        hashes.append(h[mine])
        positions.append(mine + offset)
        offset += len(h)
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    p = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    first = np.zeros(len(h), bool)
    first[np.unique(h, return_index=True)[1]] = True  # positions increase, so unique's index is the first one
    target = partition_path(files, rank, world)
    tmp = target.with_name(target.name + ".tmp.npy")
    np.save(tmp, p[~first].astype(np.int64))
    tmp.replace(target)
    return target


def duplicate_keys(files: list[Path], mine: list[Path], partitions: list[Path]) -> dict[Path, frozenset]:
    """Keys of each of `mine` (some of the source's hash files `files`, in input order) that the partitions
    (`write_partition` of every rank) mark as duplicates."""
    starts = np.cumsum([0] + [len(np.load(f)["hashes"]) for f in files])
    ranges = {f: (int(starts[i]), int(starts[i + 1])) for i, f in enumerate(files) if f in mine}
    local: dict[Path, list] = {f: [] for f in ranges}
    for partition in partitions:
        positions = np.load(partition)
        for f, (begin, end) in ranges.items():
            local[f].append(positions[(positions >= begin) & (positions < end)] - begin)
    out = {}
    for f, pieces in local.items():
        keys = np.load(f)["keys"]
        out[f] = frozenset(keys[np.concatenate(pieces)].tolist()) if pieces else frozenset()
    return out
