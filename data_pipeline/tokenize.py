"""Raw-document shards -> token shards (README "Token shard format").

Each input shard `X.tar` becomes `tokens-X.tar` with one sample per document: `tokens.npy` (1-D
uint32 ids) and `spans.json` (`[[start, end, kind], ...]`, kind text/image/video, end exclusive),
plus `tokens-X.json` with its counts. Output names follow input names, so the result does not
depend on how many ranks share the work, and a finished output shard is skipped on a rerun.
`manifest.json` merges the per-shard counts and records the vocabulary layout and fingerprint.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from queue import Queue

import numpy as np
import torch

from .media import Geometry, MediaError, as_geometry, decode_image, read_video
from .raw import SampleError, SkipCounter, parse_document
from .shards import ShardError, ShardWriter, iter_samples, list_shards, npy_bytes, read_json, write_json_atomic
from .text_tokenizer import TextTokenizer
from .visual_tokenizer import VisualTokenizer
from .vocab import VocabLayout, fingerprint


class DocumentEncoder:
    """Turns parsed segments into one token sequence with modality spans.

    Two halves, so that loader workers can do the first: `decode` (media bytes -> uint8 pixels, sized
    by the geometry) and `encode_batch` (pixels of many documents -> codes in batches of equal shapes
    -> token sequences). `encoder_seconds` is the time spent in the visual encoder.
    """

    def __init__(self, text: TextTokenizer, visual: VisualTokenizer, layout: VocabLayout,
                 geometry: Geometry | int, video_frames: int, batch_size: int = 32):
        self.text, self.visual, self.layout = text, visual, layout
        self.geometry, self.video_frames, self.batch_size = as_geometry(geometry), video_frames, batch_size
        self.encoder_seconds = 0.0

    def frame_tokens(self, ids: np.ndarray) -> list[int]:
        """Vocabulary ids (h, w) -> each row followed by <|eol|>, then <|eof|>."""
        L = self.layout
        eol = np.full((ids.shape[0], 1), L.special("<|eol|>"))
        return np.concatenate([ids.astype(np.int64), eol], axis=1).reshape(-1).tolist() + [L.special("<|eof|>")]

    def grid_tokens(self, codes: np.ndarray) -> list[int]:
        """codes (h, w) -> the frame of their visual ids."""
        return self.frame_tokens(codes.astype(np.int64) + self.layout.visual_offset)

    def visual_prefix(self, start: str, shape: tuple[int, ...]) -> list[int]:
        """`start` (<|image start|> or <|video start|>), the grid shape as text ("4*4", "2*4*4"), <|image token|>."""
        L = self.layout
        return [L.special(start)] + self.text.encode("*".join(map(str, shape))) + [L.special("<|image token|>")]

    def image_tokens(self, codes: np.ndarray) -> list[int]:
        return (self.visual_prefix("<|image start|>", codes.shape) + self.grid_tokens(codes) +
                [self.layout.special("<|image end|>")])

    def video_tokens(self, codes: np.ndarray) -> list[int]:
        frames = [tok for frame in codes for tok in self.grid_tokens(frame)]
        return self.visual_prefix("<|video start|>", codes.shape) + frames + [self.layout.special("<|video end|>")]

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
            tokens, spans = [self.layout.bos], []
            for kind, payload in doc:
                if kind == "text":
                    piece = self.text.encode(payload)
                elif kind == "image":
                    piece = self.image_tokens(next(codes))
                else:
                    piece = self.video_tokens(next(codes))
                spans.append([len(tokens), len(tokens) + len(piece), kind])
                tokens += piece
            tokens.append(self.layout.eos)
            out.append((np.asarray(tokens, dtype=np.uint32), spans))
        return out

    def encode(self, segments) -> tuple[np.ndarray, list[list]]:
        return self.encode_batch([self.decode(segments)])[0]


class DecodedShard(torch.utils.data.IterableDataset):
    """A raw shard's documents with decoded media, produced in DataLoader workers (worker w takes every
    w-th document; the DataLoader hands them back in order). Items: ("doc", key, decoded),
    ("skip", reason, message) or ("shard_error", message, None)."""

    def __init__(self, shard: Path, geometry: Geometry, video_frames: int):
        self.shard, self.geometry, self.video_frames = shard, geometry, video_frames

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        decoder = DocumentEncoder(None, None, None, self.geometry, self.video_frames)
        try:
            for i, sample in enumerate(iter_samples(self.shard)):
                if i % workers != worker:
                    continue
                where = f"{self.shard}:{sample['__key__']}"
                try:
                    yield "doc", sample["__key__"], decoder.decode(parse_document(sample))
                except SampleError as e:
                    yield "skip", e.reason, str(e)
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
    decode and torch while it computes, so decoding overlaps encoding without another process."""
    queue: Queue = Queue(depth)
    done = object()

    def produce():
        try:
            for item in items:
                queue.put(item)
        except BaseException as e:  # re-raised in the consumer
            queue.put(e)
        queue.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := queue.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def tokenize_shard(shard: Path, out_dir: Path, encoder: DocumentEncoder, workers: int = 0, window: int = 64) -> dict:
    """Tokenize one raw shard; returns its counts. Bad samples are skipped and counted by reason.

    Media are decoded in `workers` loader processes (0: a thread of this one) while this process encodes
    up to `window` documents at a time.
    """
    skipped = SkipCounter()
    counts: Counter = Counter()
    documents = 0
    writer = ShardWriter(out_dir, f"tokens-{shard.stem}", max_count=None)
    decoded = DecodedShard(shard, encoder.geometry, encoder.video_frames)
    if workers:
        loader = torch.utils.data.DataLoader(decoded, batch_size=None, collate_fn=as_is, num_workers=workers,
                                             worker_init_fn=one_thread, prefetch_factor=window)
    else:
        loader = in_background(iter(decoded), 4 * window)
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
    for item, a, b in loader:
        if item == "doc":
            pending.append((a, b))
            if len(pending) >= size:
                flush()
                size = min(2 * size, window)
        elif item == "skip":
            skipped.add(a, b)
        else:
            skipped.add("unreadable_shard", a)
    flush()
    written = writer.close()
    seconds = time.perf_counter() - start
    stats = {"input": str(shard), "output": written[0].name if written else None, "documents": documents,
             "tokens": dict(counts), "skipped": skipped.as_dict(), "seconds": round(seconds, 3),
             "encoder_seconds": round(encoder.encoder_seconds - encoder_before, 3)}
    write_json_atomic(out_dir / f"tokens-{shard.stem}.json", stats)
    return stats


def tokenize(raw_dirs: list[str | Path], out_dir: str | Path, text_model: str | Path, vq_dir: str | Path,
             geometry: Geometry | int, video_frames: int, rank: int = 0, world_size: int = 1, log=print,
             workers: int = 0) -> dict:
    """Tokenize every shard of `raw_dirs` whose index % world_size == rank; rank 0 merges the manifest.

    `geometry` sizes images and frames (an int: square crops of that side); `workers` loader processes
    decode media while this process encodes."""
    geometry = as_geometry(geometry)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text, visual = TextTokenizer(text_model), VisualTokenizer.from_pretrained(vq_dir)
    layout = VocabLayout(text.vocab_size, visual.codebook_size)
    fp = fingerprint(layout, text_model, vq_dir)
    vocab_file = out_dir / "vocab.json"
    previous = read_json(vocab_file)["fingerprint"] if vocab_file.exists() else fp
    if previous != fp:
        raise ValueError(f"{out_dir} holds token shards of another vocabulary (fingerprint {previous} != {fp}); "
                         f"use a new output directory")
    # where the tokenizers came from: `loom convert to-hf --format emu3` packs them with the model
    write_json_atomic(vocab_file, {"layout": layout.to_dict(), "fingerprint": fp, "image_size": geometry.size,
                                   "geometry": vars(geometry), "visual_tokenizer": str(Path(vq_dir).resolve())})
    shutil.copy(text_model, out_dir / "text_tokenizer.model")
    encoder = DocumentEncoder(text, visual, layout, geometry, video_frames)
    shards = [s for d in raw_dirs for s in list_shards(d)]
    start = time.time()
    for i, shard in enumerate(shards):
        if i % world_size != rank:
            continue
        if (out_dir / f"tokens-{shard.stem}.json").exists():
            log(f"tokenize: {shard.name} already done, skipped")
            continue
        with torch.inference_mode():
            stats = tokenize_shard(shard, out_dir, encoder, workers)
        log(f"tokenize: [{i + 1}/{len(shards)}] {shard.name}: {stats['documents']} documents, "
            f"{stats['tokens'].get('total', 0)} tokens, {stats['skipped']['total']} skipped, encoder busy "
            f"{stats['encoder_seconds'] / max(stats['seconds'], 1e-9):.0%} ({time.time() - start:.0f}s)")
    return merge_manifest(out_dir, [s.stem for s in shards], layout, fp) if rank == 0 else {}


def merge_manifest(out_dir: Path, stems: list[str], layout: VocabLayout, fp: str) -> dict:
    documents, tokens, skipped = 0, Counter(), Counter()
    shards = []
    for stem in stems:
        stats = read_json(out_dir / f"tokens-{stem}.json")
        documents += stats["documents"]
        tokens.update(stats["tokens"])
        skipped.update(stats["skipped"]["by_reason"])
        if stats["output"]:
            shards.append(stats["output"])
    manifest = {"documents": documents, "tokens": dict(tokens), "skipped": dict(skipped),
                "shards": shards, "fingerprint": fp, "layout": layout.to_dict()}
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest
