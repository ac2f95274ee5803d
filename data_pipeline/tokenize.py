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
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .media import MediaError, decode_image, decode_video
from .raw import SampleError, SkipCounter, parse_document
from .shards import ShardError, ShardWriter, iter_samples, list_shards, npy_bytes, read_json, \
    write_json_atomic
from .text_tokenizer import TextTokenizer
from .visual_tokenizer import VisualTokenizer
from .vocab import VocabLayout, fingerprint


class DocumentEncoder:
    """Turns parsed segments into one token sequence with modality spans."""

    def __init__(self, text: TextTokenizer, visual: VisualTokenizer, layout: VocabLayout,
                 image_size: int, video_frames: int):
        self.text, self.visual, self.layout = text, visual, layout
        self.image_size, self.video_frames = image_size, video_frames

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

    def encode(self, segments) -> tuple[np.ndarray, list[list]]:
        tokens, spans = [self.layout.bos], []
        for seg in segments:
            if seg.kind == "text":
                piece = self.text.encode(seg.text)
            elif seg.kind == "image":
                piece = self.image_tokens(self.visual.encode_image(decode_image(seg.data, self.image_size)))
            else:
                piece = self.video_tokens(self.visual.encode_video(
                    decode_video(seg.data, self.video_frames, self.image_size)))
            spans.append([len(tokens), len(tokens) + len(piece), seg.kind])
            tokens += piece
        tokens.append(self.layout.eos)
        return np.asarray(tokens, dtype=np.uint32), spans


def tokenize_shard(shard: Path, out_dir: Path, encoder: DocumentEncoder) -> dict:
    """Tokenize one raw shard; returns its counts. Bad samples are skipped and counted by reason."""
    skipped = SkipCounter()
    counts: Counter = Counter()
    documents = 0
    writer = ShardWriter(out_dir, f"tokens-{shard.stem}", max_count=None)
    try:
        for sample in iter_samples(shard):
            where = f"{shard}:{sample['__key__']}"
            try:
                tokens, spans = encoder.encode(parse_document(sample))
            except SampleError as e:
                skipped.add(e.reason, str(e))
                continue
            except MediaError as e:
                skipped.add("bad_media", f"{where}: {e}")
                continue
            writer.write({"__key__": sample["__key__"], "tokens.npy": npy_bytes(tokens),
                          "spans.json": json.dumps(spans).encode()})
            documents += 1
            counts["total"] += len(tokens)
            for start, end, kind in spans:
                counts[kind] += end - start
    except ShardError as e:
        skipped.add("unreadable_shard", str(e))
    written = writer.close()
    stats = {"input": str(shard), "output": written[0].name if written else None, "documents": documents,
             "tokens": dict(counts), "skipped": skipped.as_dict()}
    write_json_atomic(out_dir / f"tokens-{shard.stem}.json", stats)
    return stats


def tokenize(raw_dirs: list[str | Path], out_dir: str | Path, text_model: str | Path, vq_dir: str | Path,
             image_size: int, video_frames: int, rank: int = 0, world_size: int = 1, log=print) -> dict:
    """Tokenize every shard of `raw_dirs` whose index % world_size == rank; rank 0 merges the manifest."""
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
    write_json_atomic(vocab_file, {"layout": layout.to_dict(), "fingerprint": fp, "image_size": image_size,
                                   "visual_tokenizer": str(Path(vq_dir).resolve())})
    shutil.copy(text_model, out_dir / "text_tokenizer.model")
    encoder = DocumentEncoder(text, visual, layout, image_size, video_frames)
    shards = [s for d in raw_dirs for s in list_shards(d)]
    start = time.time()
    for i, shard in enumerate(shards):
        if i % world_size != rank:
            continue
        if (out_dir / f"tokens-{shard.stem}.json").exists():
            log(f"tokenize: {shard.name} already done, skipped")
            continue
        with torch.inference_mode():
            stats = tokenize_shard(shard, out_dir, encoder)
        log(f"tokenize: [{i + 1}/{len(shards)}] {shard.name}: {stats['documents']} documents, "
            f"{stats['tokens'].get('total', 0)} tokens, {stats['skipped']['total']} skipped "
            f"({time.time() - start:.0f}s)")
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
