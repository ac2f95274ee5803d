"""Streams token shards into packed global batches that do not depend on the parallel layout.

The global batch of every optimizer step has `global_batch_size` rows; row r of every step comes
from packing stream r. Stream s reads documents g = s, s + P, s + 2P, ... of each source
(P = number of streams), mixes sources by weight in tokens, and packs the documents back to back into
rows of seq_len + 1 tokens (row n+1 of a stream starts with row n's last token, so nothing is wasted;
a document cut by a row end continues in the next row). Mixing: the next document comes from the
source furthest below its weighted share of the tokens the stream has taken so far, so each
source's share of tokens stays within one document of its weight whatever the sources' document
lengths, and the position is part of the resumable state.

Document g of a source is document g mod N of epoch g // N (N documents per epoch); an epoch
visits the shards in an order shuffled by (seed, epoch), each shard's documents in stored order,
read by random access through the shard's index (data_pipeline/token_index.py). So every document is
used exactly once per epoch, by exactly one stream. Start-up reads the manifest's per-shard document
counts only; a shard's index is memory-mapped when a stream first reads that shard, and at most
OPEN_SHARDS shards are open at a time (least recently used closed first): start-up time and memory
grow with the number of shards, not of documents.

Data-parallel rank d of D trains rows [d*P/D, (d+1)*P/D) and runs only those streams. Nothing in
a stream depends on D, the micro-batch size or the other parallel sizes: any layout trains on the
same global batches, and the position of all streams (`state_dict()`, gathered from every rank
at a checkpoint) resumes under any data-parallel size.

A document of a scale-kind vocabulary is read in its next-scale training form (data_pipeline/next_scale.py):
a row then also carries each position's input where it differs from the previous token, and `horizon`, the
last position each position sees (past itself inside a block of codes predicted together).

Caption dropout (`caption_dropout` = p, for classifier-free guidance): document g of a source that holds
exactly one image or video after some text (an image-text or video-text pair) is trained without that text
(BOS, then the image or video) with probability p, drawn from (seed, source name, g): the same documents
under every layout and after resume, a fresh draw in each epoch.
"""

from __future__ import annotations

import bisect
import json
import sys
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .next_scale import NextScaleLayout
from .shards import ShardError, list_shards, npy_load, read_json
from .token_index import build_index, index_fits, load_index, read_document, save_index
from .vocab import IGNORE, IMAGE, TEXT, VIDEO, VISUAL_STRUCTURE, Vocabulary

MAX_CONSECUTIVE_BAD = 1000
CAPTION_DROPOUT_STREAM = 0xCA97  # the random stream of caption dropout, apart from any other use of the seed
OPEN_SHARDS = 64  # per source and rank: open file handles and memory-mapped indexes


def warn(message: str) -> None:
    print(f"loom: warning: {message}", file=sys.stderr, flush=True)


@dataclass
class Source:
    name: str
    path: Path
    weight: float
    shards: list[Path]
    fingerprint: str = ""
    vocabulary: Vocabulary | None = None
    shard_documents: list[int] | None = None
    """Documents per shard, from the manifest (None: shards written before it recorded them)."""
    shard_bytes: list[int] | None = None

    @classmethod
    def open(cls, name: str, path: str | Path, weight: float) -> "Source":
        path = Path(path)
        manifest = read_json(path / "manifest.json")
        if "shards" not in manifest and "sources" in manifest:  # the job's merged manifest, over one folder per source
            folders = ", ".join(str(path / s) for s in sorted(manifest["sources"]))
            raise ShardError(f"{path / 'manifest.json'} is a tokenize job's summary of several sources; point "
                             f"data.sources.{name}.path at one source's folder: {folders}")
        shards = [path / s for s in manifest["shards"]] or list_shards(path)
        counts, sizes = manifest.get("shard_documents"), manifest.get("shard_bytes")
        if counts is not None and (len(counts) != len(shards) or len(sizes or ()) != len(shards)):
            raise ShardError(f"{path / 'manifest.json'}: shard_documents and shard_bytes must list every shard; "
                             f"rewrite them with `loom data index {path}`")
        return cls(name, path, weight, shards, manifest["fingerprint"], Vocabulary.from_dict(manifest["layout"]),
                   counts, sizes)


def read_manifest_fingerprints(sources: list[Source]) -> tuple[str, Vocabulary]:
    """The common fingerprint and vocabulary of all sources; refuses sources that disagree."""
    if len({src.fingerprint for src in sources}) != 1:
        detail = ", ".join(f"{src.name}: {src.fingerprint}" for src in sources)
        raise ValueError(f"data sources were tokenized with different vocabularies ({detail}); "
                         f"retokenize them with the same tokenizers")
    return sources[0].fingerprint, sources[0].vocabulary


def loss_kinds(tokens: np.ndarray, spans: list, vocabulary: Vocabulary) -> np.ndarray:
    """Per-token loss kind: text, image code, video code, or visual structure (grid prefix, eol...)."""
    kinds = np.full(len(tokens), TEXT, dtype=np.int8)
    visual = vocabulary.is_visual(tokens)
    for start, end, kind in spans:
        if kind in ("image", "video"):
            kinds[start:end] = np.where(visual[start:end], IMAGE if kind == "image" else VIDEO,
                                        VISUAL_STRUCTURE)
    return kinds


class SourceReader:
    """Random access to document g of a source's endless, epoch-shuffled sequence."""

    def __init__(self, source: Source, vocabulary: Vocabulary, seed: int, caption_dropout: float = 0.0):
        self.source, self.vocabulary, self.seed, self.caption_dropout = source, vocabulary, seed, caption_dropout
        self._media_starts = [vocabulary.special("<|image start|>"), vocabulary.special("<|video start|>")]
        self.next_scale = NextScaleLayout(vocabulary) if "scale" in vocabulary.kinds else None
        self._open: OrderedDict[int, tuple[np.ndarray, object]] = OrderedDict()
        self._built: dict[int, np.ndarray] = {}  # indexes built here that could not be saved beside their shard
        self._warned_unindexed = False
        if source.shard_documents is None:
            warn(f"{source.path}: its manifest has no per-shard document counts; indexing its {len(source.shards)} "
                 f"shards now (run `loom data index {source.path}` once to start without this)")
            self.counts = np.array([len(self._index(i)) for i in range(len(source.shards))], dtype=np.int64)
        else:
            self.counts = np.array(source.shard_documents, dtype=np.int64)
        self.docs_per_epoch = int(self.counts.sum())
        if self.docs_per_epoch == 0:
            raise ValueError(f"source '{source.name}' ({source.path}) has no readable documents")
        self._epoch, self._order, self._starts = -1, None, None

    def _index(self, i: int) -> np.ndarray:
        """Shard i's index: its saved file where that matches the shard, else built from its tar headers (and
        saved where possible). A shard that differs from its manifest is named; documents it lacks are skipped."""
        if i in self._built:
            return self._built[i]
        shard = self.source.shards[i]
        expected = None if self.source.shard_bytes is None else self.source.shard_bytes[i]
        if not shard.exists():
            warn(f"{shard} is missing: its documents are skipped")
            self._built[i] = np.zeros(0, [("key", "S1")])
            return self._built[i]
        size = shard.stat().st_size
        if expected is not None and size != expected:
            warn(f"{shard} has {size} bytes, its manifest says {expected}: the shard changed since it was written, "
                 f"so its index is rebuilt from the tar headers and documents it no longer holds are skipped")
        else:
            index = load_index(shard)
            if index is not None and index_fits(index, size) and (self.source.shard_documents is None
                                                                  or len(index) == self.counts[i]):
                return index
            if not self._warned_unindexed:
                self._warned_unindexed = True
                warn(f"{self.source.path}: shards without a matching index (first {shard.name}) are indexed on first "
                     f"use; `loom data index {self.source.path}` writes them all once")
        index, error = build_index(shard)
        if error:
            warn(f"{error}; the rest of the shard is skipped")
        elif expected in (None, size) and save_index(shard, index):
            return index
        self._built[i] = index
        return index

    def _shard(self, i: int) -> tuple[np.ndarray, object]:
        """(index, open file) of shard i, opened on first use; the least recently used beyond OPEN_SHARDS close."""
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        index = self._index(i)
        self._open[i] = (index, open(self.source.shards[i], "rb") if len(index) else None)
        if len(self._open) > OPEN_SHARDS:
            _, (_, handle) = self._open.popitem(last=False)
            if handle is not None:
                handle.close()
        return self._open[i]

    def _locate(self, g: int) -> tuple[int, int]:
        epoch, k = divmod(g, self.docs_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
            self._starts = np.concatenate([[0], np.cumsum(self.counts[self._order])])
        j = bisect.bisect_right(self._starts, k) - 1
        shard = int(self._order[j])
        return shard, k - int(self._starts[j])

    def read(self, g: int) -> tuple[np.ndarray, ...]:
        """(tokens, loss kinds, inputs, reach) of document g (inputs: each position's input id; reach: how many
        positions past itself it sees; the tokens and 0 but for next-scale blocks); raises ValueError/ShardError
        for a bad sample."""
        shard, i = self._locate(g)
        path = self.source.shards[shard]
        try:
            index, handle = self._shard(shard)
        except OSError as e:
            raise ShardError(f"{path}: cannot be read ({e})") from None
        if i >= len(index):
            raise ValueError(f"{path}: document #{i} is missing (the shard holds {len(index)} of the "
                             f"{self.counts[shard]} documents it had)")
        sample = read_document(path, index[i], handle)
        where = f"{sample['__shard__']}:{sample['__key__']}"
        try:
            tokens = npy_load(sample["tokens.npy"]).astype(np.int64)
            spans = json.loads(sample["spans.json"])
            if tokens.ndim != 1 or len(tokens) < 2 or tokens.min() < 0 or tokens.max() >= self.vocabulary.size:
                raise ValueError(f"tokens.npy must be 1-D ids in [0, {self.vocabulary.size}) with >= 2 tokens")
            kinds = loss_kinds(tokens, spans, self.vocabulary)
            if self.next_scale is not None:
                return self.next_scale.rewrite(tokens, kinds)
            return tokens, kinds, tokens, np.zeros(len(tokens), np.int64)
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise ValueError(f"{where}: {e}") from None

    def without_caption(self, g: int, document: tuple[np.ndarray, ...]) -> tuple | None:
        """Document g (the arrays of `read`) without the text before its image or video, when it is a pair and
        caption dropout draws it; else None."""
        if not self.caption_dropout:
            return None
        tokens = document[0]
        starts = np.flatnonzero(np.isin(tokens, self._media_starts))
        if len(starts) != 1 or starts[0] <= 1:
            return None
        draw = np.random.default_rng([self.seed, CAPTION_DROPOUT_STREAM, zlib.crc32(self.source.name.encode()), g])
        if draw.random() >= self.caption_dropout:
            return None
        keep = np.r_[0, starts[0]:len(tokens)]  # BOS, then the image or video and what follows it
        return tuple(a[keep] for a in document)


class PackingStream:
    """One row slot of the global batch: its documents, its mixing generator, its unfinished document."""

    def __init__(self, index: int, num_streams: int, readers: list[SourceReader], weights: np.ndarray,
                 seq_len: int, state: dict | None = None):
        self.index, self.num_streams, self.readers, self.weights = index, num_streams, readers, weights
        self.row_len = seq_len + 1
        self.next_doc = {r.source.name: 0 for r in readers}  # j: the stream's next document is index + P*j
        self.tokens = {r.source.name: 0 for r in readers}  # tokens taken from each source
        self.skipped: Counter = Counter()
        self.captions_dropped = 0
        self.pending = (np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int64), np.zeros(0, np.int64))
        if state is not None:
            self.next_doc.update(state["next_doc"])
            self.tokens.update(state["tokens"])
            self.skipped.update(state["skipped"])
            self.captions_dropped = state.get("captions_dropped", 0)
            tokens = np.array(state["pending_tokens"], np.int64)
            # states saved before next-scale rows: the inputs are the tokens, no position sees past itself
            self.pending = (tokens, np.array(state["pending_kinds"], np.int8),
                            np.array(state.get("pending_inputs", tokens), np.int64),
                            np.array(state.get("pending_reach", np.zeros(len(tokens))), np.int64))

    def state(self) -> dict:
        tokens, kinds, inputs, reach = (a.tolist() for a in self.pending)
        return {"tokens": dict(self.tokens), "next_doc": dict(self.next_doc), "skipped": dict(self.skipped),
                "captions_dropped": self.captions_dropped, "pending_tokens": tokens, "pending_kinds": kinds,
                "pending_inputs": inputs, "pending_reach": reach}

    def _next_source(self) -> SourceReader:
        """The reader whose source is furthest below its share: least tokens / weight."""
        shares = [(self.tokens[r.source.name] / w, i) for i, (r, w) in enumerate(zip(self.readers, self.weights))
                  if w > 0]
        return self.readers[min(shares)[1]]

    def _next_document(self) -> tuple[np.ndarray, ...]:
        reader = self._next_source()
        name = reader.source.name
        for _ in range(MAX_CONSECUTIVE_BAD):
            g = self.index + self.num_streams * self.next_doc[name]
            self.next_doc[name] += 1
            try:
                document = reader.read(g)
                dropped = reader.without_caption(g, document)
                if dropped is not None:
                    document = dropped
                    self.captions_dropped += 1
                self.tokens[name] += len(document[0])
                return document
            except (ValueError, ShardError) as e:
                self.skipped["bad_token_sample"] += 1
                warn(f"{e}; skipped")
        raise ValueError(f"source '{name}' ({reader.source.path}): {MAX_CONSECUTIVE_BAD} bad samples in a row")

    def next_row(self) -> dict:
        pieces, filled = [], 0
        while filled < self.row_len:
            if len(self.pending[0]) == 0:
                self.pending = self._next_document()
            take = min(self.row_len - filled, len(self.pending[0]))
            pieces.append(tuple(a[:take] for a in self.pending))
            filled += take
            # the row's last token is also the next row's first input, so it stays pending
            keep = take - 1 if filled == self.row_len else take
            self.pending = tuple(a[keep:] for a in self.pending)
        return pack_row(pieces)


def pack_row(pieces: list[tuple[np.ndarray, ...]]) -> dict:
    """Inputs and targets of one row of seq_len + 1 tokens; each piece is (part of) one document, as the arrays
    (tokens, kinds, inputs, reach) of `SourceReader.read`."""
    tokens, kinds, inputs, reach = (np.concatenate([p[i] for p in pieces]) for i in range(4))
    segment = np.concatenate([np.full(len(p[0]), i) for i, p in enumerate(pieces)])
    positions = np.concatenate([np.arange(len(p[0])) for p in pieces])
    same_doc = segment[1:] == segment[:-1]
    at = np.arange(len(tokens) - 1)
    # a block cut by the row's end is seen up to the row's last input (its rest continues the next row)
    horizon = at + np.minimum(reach[:-1], at[-1] - at)
    return {"tokens": inputs[:-1], "targets": tokens[1:], "doc_ids": segment[:-1].astype(np.int64),
            "positions": positions[:-1].astype(np.int64), "horizon": horizon.astype(np.int64),
            "loss_kind": np.where(same_doc, kinds[1:], IGNORE).astype(np.int64)}


class TokenLoader:
    """This data-parallel rank's share of every global batch, as micro-batches, with resumable state."""

    def __init__(self, sources: list[Source], vocabulary: Vocabulary, *, seq_len: int, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 caption_dropout: float = 0.0):
        if any(s.weight < 0 for s in sources) or not any(s.weight > 0 for s in sources):
            raise ValueError("mixing weights must be >= 0 with at least one > 0: "
                             + ", ".join(f"{s.name}: {s.weight}" for s in sources))
        if global_batch_size % (dp_size * micro_batch_size):
            raise ValueError(f"global batch {global_batch_size} is not divisible by data-parallel size {dp_size} "
                             f"x micro-batch {micro_batch_size}")
        self.readers = [SourceReader(src, vocabulary, seed, caption_dropout) for src in sources]
        self.weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights /= self.weights.sum()
        self.seq_len = seq_len
        self.num_streams, self.micro_batch_size = global_batch_size, micro_batch_size
        per_rank = global_batch_size // dp_size
        self.owned = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        self.streams = [PackingStream(s, self.num_streams, self.readers, self.weights, seq_len)
                        for s in self.owned]
        self.steps = 0

    def next_step(self) -> list[dict]:
        """The micro-batches of this rank for the next optimizer step: (mbs, seq_len) tensors each."""
        rows = [stream.next_row() for stream in self.streams]
        self.steps += 1
        mbs = self.micro_batch_size
        return [{k: torch.from_numpy(np.stack([r[k] for r in rows[i:i + mbs]])) for k in rows[0]}
                for i in range(0, len(rows), mbs)]

    def skipped(self) -> int:
        return sum(sum(s.skipped.values()) for s in self.streams)

    def captions_dropped(self) -> int:
        return sum(s.captions_dropped for s in self.streams)

    def state_dict(self) -> dict:
        """This rank's streams; `merge_states` joins the dicts of all data-parallel ranks."""
        return {"steps": self.steps, "num_streams": self.num_streams, "seq_len": self.seq_len,
                "streams": {str(s.index): s.state() for s in self.streams}}

    def load_state_dict(self, state: dict) -> None:
        if state["num_streams"] != self.num_streams or state["seq_len"] != self.seq_len:
            raise ValueError(f"the saved data position is for global batch {state['num_streams']} and seq_len "
                             f"{state['seq_len']}; this run has {self.num_streams} and {self.seq_len}. "
                             f"Keep data.global_batch_size and data.seq_len when resuming")
        missing = [s for s in self.owned if str(s) not in state["streams"]]
        if missing:
            raise ValueError(f"the saved data position lacks streams {missing[:5]}...; save it with merge_states")
        self.steps = state["steps"]
        self.streams = [PackingStream(s, self.num_streams, self.readers, self.weights, self.seq_len,
                                      state["streams"][str(s)]) for s in self.owned]


def merge_states(states: list[dict]) -> dict:
    """One state with the streams of every data-parallel rank (their steps agree)."""
    merged = {**states[0], "streams": {}}
    for state in states:
        merged["streams"].update(state["streams"])
    return merged
