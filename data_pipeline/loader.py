"""Streams token shards into packed training batches, with exact, resumable state.

Order of documents: each source is an endless stream of epochs; an epoch visits the source's
shards in an order shuffled by (seed, epoch) and each shard's documents in stored order. Document
k of an epoch belongs to consumer k % C, where the C = dp_size x num_workers consumers are the
(data-parallel rank, worker) pairs, so over one epoch every document is seen once across all
ranks. Each consumer mixes its sources by weight with its own seeded generator, and packs
documents back to back into rows of seq_len + 1 tokens (row n+1 starts with row n's last token,
so no token is wasted); a document cut by a row end continues at the start of the next row.

Resume: the state of a consumer is its position in every source (epoch, shard, sample), its
generator state and the unfinished part of the current document. `TokenLoader.state_dict()` holds
the state of every worker after the last batch it delivered, so a restart continues exactly.
"""

from __future__ import annotations

import copy
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import ShardError, iter_samples, list_shards, npy_load, read_json
from .vocab import IGNORE, IMAGE, TEXT, VIDEO, VISUAL_STRUCTURE, VocabLayout


MAX_CONSECUTIVE_BAD = 1000


@dataclass
class Source:
    name: str
    path: Path
    weight: float
    shards: list[Path]

    @classmethod
    def open(cls, name: str, path: str | Path, weight: float) -> "Source":
        path = Path(path)
        manifest = read_json(path / "manifest.json")
        return cls(name, path, weight, [path / s for s in manifest["shards"]] or list_shards(path))


def read_manifest_fingerprints(sources: list[Source]) -> tuple[str, VocabLayout]:
    """The common fingerprint and layout of all sources; refuses sources that disagree."""
    seen = {}
    for src in sources:
        manifest = read_json(src.path / "manifest.json")
        seen[src.name] = (manifest["fingerprint"], VocabLayout.from_dict(manifest["layout"]))
    fingerprints = {fp for fp, _ in seen.values()}
    if len(fingerprints) != 1:
        detail = ", ".join(f"{name}: {fp}" for name, (fp, _) in seen.items())
        raise ValueError(f"data sources were tokenized with different vocabularies ({detail}); "
                         f"retokenize them with the same tokenizers")
    return next(iter(seen.values()))


def loss_kinds(tokens: np.ndarray, spans: list, layout: VocabLayout) -> np.ndarray:
    """Per-token loss kind: text, image code, video code, or visual structure (grid prefix, eol...)."""
    kinds = np.full(len(tokens), TEXT, dtype=np.int8)
    visual = layout.is_visual(tokens)
    for start, end, kind in spans:
        if kind in ("image", "video"):
            kinds[start:end] = np.where(visual[start:end], IMAGE if kind == "image" else VIDEO,
                                        VISUAL_STRUCTURE)
    return kinds


class SourceCursor:
    """Position of one consumer in one source; yields the documents that belong to it."""

    def __init__(self, source: Source, seed: int, consumer: int, consumers: int, state: dict | None):
        self.source, self.seed = source, seed
        self.consumer, self.consumers = consumer, consumers
        s = state or {"epoch": 0, "shard": 0, "sample": 0, "k": 0, "skipped": {}}
        self.epoch, self.shard, self.sample, self.k = s["epoch"], s["shard"], s["sample"], s["k"]
        self.skipped = Counter(s["skipped"])
        self._iter = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "sample": self.sample, "k": self.k,
                "skipped": dict(self.skipped)}

    def _skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        print(f"loom: warning: {message}; skipped", file=sys.stderr, flush=True)

    def _order(self) -> list[Path]:
        rng = np.random.default_rng([self.seed, self.epoch])
        return [self.source.shards[i] for i in rng.permutation(len(self.source.shards))]

    def _samples(self):
        """Endless (sample) stream starting at the saved position; advances the position."""
        while True:
            order = self._order()
            while self.shard < len(order):
                try:
                    for i, sample in enumerate(iter_samples(order[self.shard])):
                        if i < self.sample:
                            continue
                        self.sample = i + 1
                        self.k += 1
                        if (self.k - 1) % self.consumers == self.consumer:
                            yield sample
                except ShardError as e:  # the samples before the damage were used
                    self._skip("unreadable_shard", str(e))
                self.shard, self.sample = self.shard + 1, 0
            self.epoch, self.shard, self.sample, self.k = self.epoch + 1, 0, 0, 0

    def next_document(self, layout: VocabLayout) -> tuple[np.ndarray, np.ndarray]:
        """The next readable document of this consumer; bad samples are skipped and counted."""
        if self._iter is None:
            self._iter = self._samples()
        for _ in range(MAX_CONSECUTIVE_BAD):
            sample = next(self._iter)
            try:
                tokens = npy_load(sample["tokens.npy"]).astype(np.int64)
                spans = json.loads(sample["spans.json"])
                if tokens.ndim != 1 or len(tokens) < 2 or tokens.min() < 0 or tokens.max() >= layout.size:
                    raise ValueError(f"tokens.npy must be 1-D ids in [0, {layout.size}) with >= 2 tokens")
                return tokens, loss_kinds(tokens, spans, layout)
            except (KeyError, ValueError, TypeError, OSError) as e:
                self._skip("bad_token_sample", f"{sample['__shard__']}:{sample['__key__']}: {e}")
        raise ValueError(f"source '{self.source.name}' ({self.source.path}): {MAX_CONSECUTIVE_BAD} bad samples "
                         f"in a row; check the token shards")


class PackedStream(IterableDataset):
    """Yields (batch, logical worker id, state after the batch) for one data-parallel rank."""

    def __init__(self, sources: list[Source], layout: VocabLayout, seq_len: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, num_workers: int, states: list | None,
                 rotation: int = 0):
        self.sources, self.layout = sources, layout
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.workers = max(num_workers, 1)
        self.states, self.rotation = states, rotation

    def __iter__(self):
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.rotation) % self.workers
        consumer, consumers = self.dp_rank * self.workers + logical, self.dp_size * self.workers
        state = self.states[logical] if self.states else None
        cursors = [SourceCursor(src, self.seed, consumer, consumers,
                                state["sources"][src.name] if state else None) for src in self.sources]
        rng = np.random.default_rng([self.seed, consumer, 7])
        if state:
            rng.bit_generator.state = state["rng"]
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        weights /= weights.sum()
        pending = (np.array(state["pending_tokens"], dtype=np.int64),
                   np.array(state["pending_kinds"], dtype=np.int8)) if state else None
        row_len = self.seq_len + 1
        while True:
            rows = []
            for _ in range(self.micro_batch_size):
                pieces, filled = [], 0
                while filled < row_len:
                    if pending is None or len(pending[0]) == 0:
                        pending = cursors[rng.choice(len(cursors), p=weights)].next_document(self.layout)
                    take = min(row_len - filled, len(pending[0]))
                    pieces.append((pending[0][:take], pending[1][:take]))
                    filled += take
                    # the row's last token is also the next row's first input, so it stays pending
                    keep = take - 1 if filled == row_len else take
                    pending = (pending[0][keep:], pending[1][keep:])
                rows.append(self._row(pieces))
            batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
            new_state = {"sources": {c.source.name: c.state() for c in cursors},
                         "rng": rng.bit_generator.state,
                         "pending_tokens": pending[0].tolist(), "pending_kinds": pending[1].tolist()}
            yield batch, logical, new_state

    @staticmethod
    def _row(pieces: list[tuple[np.ndarray, np.ndarray]]) -> dict:
        """Inputs and targets of one packed row of seq_len + 1 tokens; each piece is one document."""
        tokens = np.concatenate([t for t, _ in pieces])
        kinds = np.concatenate([k for _, k in pieces])
        segment = np.concatenate([np.full(len(t), i) for i, (t, _) in enumerate(pieces)])
        positions = np.concatenate([np.arange(len(t)) for t, _ in pieces])
        same_doc = segment[1:] == segment[:-1]
        return {"tokens": tokens[:-1], "targets": tokens[1:], "doc_ids": segment[:-1].astype(np.int64),
                "positions": positions[:-1].astype(np.int64),
                "loss_kind": np.where(same_doc, kinds[1:], IGNORE).astype(np.int64)}


class TokenLoader:
    """The training-side loader: an iterator of batches with `state_dict()` / `load_state_dict()`."""

    def __init__(self, sources: list[Source], layout: VocabLayout, seq_len: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, num_workers: int = 0):
        self.args = (sources, layout, seq_len, micro_batch_size, dp_rank, dp_size, seed, num_workers)
        self.num_workers = num_workers
        self.worker_states: list | None = None
        self.batches = 0
        self._iter = None

    def state_dict(self) -> dict:
        return {"worker_states": copy.deepcopy(self.worker_states), "batches": self.batches,
                "num_workers": self.num_workers}

    def skipped(self) -> int:
        """Samples and shards skipped so far by this rank's workers (as of their last batch)."""
        return sum(n for w in self.worker_states or [] if w for src in w["sources"].values()
                   for n in src["skipped"].values())

    def load_state_dict(self, state: dict) -> None:
        if state["num_workers"] != self.num_workers:
            raise ValueError(f"the saved data position was made with data.num_workers="
                             f"{state['num_workers']}; resume with the same value (now {self.num_workers})")
        self.worker_states, self.batches = state["worker_states"], state["batches"]
        self._iter = None

    def _start(self):
        workers = max(self.num_workers, 1)
        dataset = PackedStream(*self.args, states=self.worker_states, rotation=self.batches % workers)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            persistent_workers=False, prefetch_factor=4 if self.num_workers else None)
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = self._start()
        batch, logical, state = next(self._iter)
        if self.worker_states is None:
            self.worker_states = [None] * max(self.num_workers, 1)
        self.worker_states[logical] = state
        self.batches += 1
        return batch
