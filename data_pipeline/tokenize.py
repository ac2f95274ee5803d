"""One input file -> one token shard (docs/data.md, "Token shard format"); the job around it is tokenize_job.py.

Input `X.*` becomes `tokens-X.tar` with one sample per document: `tokens.npy` (1-D uint32 ids) and
`spans.json` (`[[start, end, kind], ...]`, kind text/image/video, end exclusive), plus `tokens-X.json`
with its counts, written last: a file with its .json is finished, one without is redone.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from queue import Full, Queue

import numpy as np
import torch

from .media import Geometry, MediaError, as_geometry, decode_image, read_video
from .raw import SampleError, SkipCounter
from .shards import ShardError, ShardWriter, npy_bytes, write_json_atomic
from .token_index import build_index, save_index
from .sources import read_input
from .text_tokenizer import TextTokenizer
from .tokenize_config import TokenizeSource
from .visual_tokenizer import VisualTokenizer
from .vocab import SCALE_MARKER, VisualPart, Vocabulary


class DocumentEncoder:
    """Turns parsed segments into one token sequence with modality spans.

    Two halves, so that loader workers can do the first: `decode` (media bytes -> uint8 pixels, sized
    by the geometry) and `encode_batch` (pixels of many documents -> codes in batches of equal shapes
    -> token sequences). `encoder_seconds` is the time spent in the visual encoder.
    """

    def __init__(self, text: TextTokenizer, visual: VisualTokenizer, vocabulary: Vocabulary,
                 geometry: Geometry | int, video_frames: int, batch_size: int = 32, part: VisualPart | None = None):
        """`part`: the vocabulary's ids of `visual` (its only part unless the vocabulary holds several)."""
        self.text, self.visual, self.vocabulary = text, visual, vocabulary
        self.part = part or (vocabulary.parts[0] if vocabulary else None)
        self.geometry, self.video_frames, self.batch_size = as_geometry(geometry), video_frames, batch_size
        self.encoder_seconds = 0.0

    def frame_tokens(self, ids: np.ndarray) -> list[int]:
        """Vocabulary ids (h, w) -> each row followed by <|eol|>, then <|eof|>."""
        L = self.vocabulary
        eol = np.full((ids.shape[0], 1), L.special("<|eol|>"))
        return np.concatenate([ids.astype(np.int64), eol], axis=1).reshape(-1).tolist() + [L.special("<|eof|>")]

    def grid_tokens(self, codes) -> list[int]:
        """codes (h, w) -> the frame of their visual ids; the scale kind's maps [(h_k, w_k)] -> each after
        <|scale|>, then <|eof|>."""
        L, offset = self.vocabulary, self.part.offset
        if self.part.kind != "scale":
            return self.frame_tokens(codes.astype(np.int64) + offset)
        marker = [L.special(SCALE_MARKER)]
        return [t for m in codes for t in marker + (m.astype(np.int64).reshape(-1) + offset).tolist()] + \
            [L.special("<|eof|>")]

    @staticmethod
    def grid_shape(codes) -> tuple[int, ...]:
        """The shape of an image's or video's codes (t, h, w or h, w): the finest map's for the scale kind."""
        return codes[-1].shape if isinstance(codes, list) else codes.shape

    def visual_prefix(self, start: str, shape: tuple[int, ...]) -> list[int]:
        """`start` (<|image start|> or <|video start|>), the grid shape as text ("4*4", "2*4*4"), <|image token|>."""
        L = self.vocabulary
        return [L.special(start)] + self.text.encode("*".join(map(str, shape))) + [L.special("<|image token|>")]

    def image_tokens(self, codes) -> list[int]:
        return (self.visual_prefix("<|image start|>", self.grid_shape(codes)) + self.grid_tokens(codes) +
                [self.vocabulary.special("<|image end|>")])

    def video_tokens(self, codes) -> list[int]:
        """codes (t, h, w), or the scale kind's maps [(t, h_k, w_k)] -> the video, frame by frame."""
        shape = self.grid_shape(codes)
        per_frame = [[m[i] for m in codes] for i in range(shape[0])] if isinstance(codes, list) else codes
        frames = [tok for frame in per_frame for tok in self.grid_tokens(frame)]
        return self.visual_prefix("<|video start|>", shape) + frames + [self.vocabulary.special("<|video end|>")]

    def decode(self, segments) -> list[tuple[str, str | np.ndarray]]:
        """Segments -> (kind, text or uint8 pixels: (H, W, 3) image, (T, H, W, 3) video); MediaError if bad."""
        out = []
        for seg in segments:
            if seg.kind == "text":
                out.append(("text", seg.text))
            elif seg.kind == "image":
                out.append(("image", decode_image(seg.data, self.geometry)))
            else:
                out.append(("video", read_video(seg.data, self.video_frames, self.geometry).frames))
        return out

    def encode_media(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Pixels of images and videos, in any order and shapes -> their codes, encoded in batches of one shape."""
        codes: list = [None] * len(arrays)
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, a in enumerate(arrays):
            by_shape[a.shape].append(i)
        start = time.perf_counter()
        for shape, index in by_shape.items():
            for b in range(0, len(index), self.batch_size):
                chunk = index[b:b + self.batch_size]
                if len(shape) == 3:
                    batch = self.visual.encode_images(np.stack([arrays[i] for i in chunk]))
                else:
                    batch = [self.visual.encode_video(arrays[i]) for i in chunk]
                for i, c in zip(chunk, batch):
                    codes[i] = c
        self.encoder_seconds += time.perf_counter() - start
        return codes

    def encode_batch(self, documents: list[list[tuple]]) -> list[tuple[np.ndarray, list[list]]]:
        """Decoded documents -> (uint32 tokens, spans [[start, end, kind], ...]) each."""
        media = [payload for doc in documents for kind, payload in doc if kind != "text"]
        codes = iter(self.encode_media(media))
        out = []
        for doc in documents:
            tokens, spans = [self.vocabulary.bos], []
            for kind, payload in doc:
                if kind == "text":
                    piece = self.text.encode(payload)
                elif kind == "image":
                    piece = self.image_tokens(next(codes))
                else:
                    piece = self.video_tokens(next(codes))
                spans.append([len(tokens), len(tokens) + len(piece), kind])
                tokens += piece
            tokens.append(self.vocabulary.eos)
            out.append((np.asarray(tokens, dtype=np.uint32), spans))
        return out

    def encode(self, segments) -> tuple[np.ndarray, list[list]]:
        return self.encode_batch([self.decode(segments)])[0]


class DecodedShard(torch.utils.data.IterableDataset):
    """An input file's documents with decoded media, produced in DataLoader workers (worker w takes every
    w-th sample; the DataLoader hands them back in order). Items: ("doc", key, decoded),
    ("skip", reason, message) or ("shard_error", message, None). Keys in `drop` are skipped as duplicates."""

    def __init__(self, source: TokenizeSource, path: Path, geometry: Geometry, video_frames: int,
                 drop: frozenset = frozenset()):
        self.source, self.path, self.geometry, self.video_frames, self.drop = source, path, geometry, video_frames, drop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        decoder = DocumentEncoder(None, None, None, self.geometry, self.video_frames)
        try:
            for i, item in enumerate(read_input(self.source, self.path)):
                if i % workers != worker:
                    continue
                if isinstance(item, SampleError):
                    yield "skip", item.reason, str(item)
                    continue
                key, segments = item
                where = f"{self.path}:{key}"
                if key in self.drop:
                    yield "skip", "duplicate", f"{where}: same content as an earlier document"
                    continue
                try:
                    yield "doc", key, decoder.decode(segments)
                except MediaError as e:
                    yield "skip", e.reason, f"{where}: {e}"
        except ShardError as e:
            if worker == 0:
                yield "shard_error", str(e), None


def one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding is Pillow/PyAV work; the encoder keeps the cores


def as_is(item):
    return item  # the DataLoader's default would turn the numpy pixels into tensors


def in_background(items: Iterator, depth: int) -> Iterator:
    """`items`, produced by a thread up to `depth` ahead. Pillow and PyAV release the GIL while they
    decode and torch while it computes, so decoding overlaps encoding without another process.
    Closing the generator early stops the thread."""
    queue: Queue = Queue(depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as e:  # re-raised in the consumer
            put(e)
        put(done)

    threading.Thread(target=produce, daemon=True).start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def tokenize_shard(source: TokenizeSource, path: Path, out_dir: Path, encoder: DocumentEncoder, workers: int = 0,
                   max_consecutive_failures: int = 100, drop: frozenset = frozenset(), window: int = 64) -> dict:
    """Tokenize one input file into `tokens-{stem}.tar`; returns its counts. Bad samples are skipped and
    counted by reason; after `max_consecutive_failures` in a row the file is marked failed (what it gave so far
    is kept). Media are decoded in `workers` loader processes (0: by this process; in a thread when the
    encoder is on a GPU) while this process encodes up to `window` documents at a time."""
    skipped = SkipCounter()
    counts: Counter = Counter()
    documents, failures, failed = 0, 0, None
    writer = ShardWriter(out_dir, f"tokens-{path.stem}", max_count=None)
    decoded = DecodedShard(source, path, encoder.geometry, encoder.video_frames, drop)
    if workers:
        items = iter(torch.utils.data.DataLoader(decoded, batch_size=None, collate_fn=as_is, num_workers=workers,
                                                 worker_init_fn=one_thread, prefetch_factor=window))
    elif encoder.visual.device.type == "cuda":
        items = in_background(iter(decoded), 4 * window)
    else:
        items = iter(decoded)
    pending: list[tuple[str, list]] = []
    encoder_before, start = encoder.encoder_seconds, time.perf_counter()

    def flush():
        nonlocal documents
        for (key, _), (tokens, spans) in zip(pending, encoder.encode_batch([doc for _, doc in pending])):
            writer.write({"__key__": key, "tokens.npy": npy_bytes(tokens), "spans.json": json.dumps(spans).encode()})
            documents += 1
            counts["total"] += len(tokens)
            for begin, end, kind in spans:
                counts[kind] += end - begin
        pending.clear()

    size = min(8, window)  # small first batches, so the encoder starts before the workers fill a window
    for item, a, b in items:
        if item == "doc":
            failures = 0
            pending.append((a, b))
            if len(pending) >= size:
                flush()
                size = min(2 * size, window)
            continue
        if item == "skip":
            skipped.add(a, b)
            failures += 1
            if failures >= max_consecutive_failures:
                failed = f"{failures} failed samples in a row (the last: {b}); the rest of the file is not read"
                break
        else:
            skipped.add("unreadable_shard", a)
            failed = a
    if hasattr(items, "close"):
        items.close()  # stops the background thread of an abandoned file
    del items  # a DataLoader iterator stops its worker processes when dropped
    flush()
    written = writer.close()
    if written:  # the loader reads the shard through this index, and starts from the counts in the manifest
        index, error = build_index(written[0])
        if error or len(index) != documents or not save_index(written[0], index):
            raise ShardError(f"{written[0]}: could not be indexed after writing ({error or 'not writable'})")
    seconds = time.perf_counter() - start
    stats = {"input": str(path), "output": written[0].name if written else None, "documents": documents,
             "bytes": written[0].stat().st_size if written else 0,
             "tokens": dict(counts), "skipped": skipped.as_dict(), "failed": failed, "seconds": round(seconds, 3),
             "encoder_seconds": round(encoder.encoder_seconds - encoder_before, 3)}
    write_json_atomic(out_dir / f"tokens-{path.stem}.json", stats)
    return stats
