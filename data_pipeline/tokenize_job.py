"""The tokenize job: every source's input files -> token shards, on any number of ranks and nodes.

The work list is every (source, input file) in config order; rank r of W takes items r, r + W, ...
Each input file becomes its own output shard named after it (tokenize.py), so the output does
not depend on W, and a rerun of the same command skips files whose `tokens-X.json` exists and
redoes the rest (a killed rank leaves at most a `.tar.tmp`). Ranks talk only through the output
directory (a shared filesystem on several nodes): exact-duplicate removal hashes each file into
`OUT/<source>/hashes/` and partitions the hashes over the ranks (dedup.py), and rank 0 waits for
every file's counts before merging the manifests.

Outputs: OUT/<source>/ (tokens-*.tar, tokens-*.json, manifest.json, vocab.json, and the text tokenizer:
text_tokenizer.model, or a transformers tokenizer's text_tokenizer/ directory) per source, and OUT/manifest.json
merged over sources.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections import Counter
from pathlib import Path

import torch

from common.config import ConfigError

from .media import Geometry, as_geometry
from .dedup import duplicate_keys, hash_file, partition_path, write_partition
from .shards import read_json, write_json_atomic
from .sources import list_inputs
from .text_tokenizer import AnyTextTokenizer, load_text_tokenizer
from .tokenize import DocumentEncoder, tokenize_shard
from .tokenize_config import TokenizeConfig, TokenizeSource
from .visual_tokenizer import load_visual_tokenizer
from .vocab import MAIN_PART, Vocabulary, fingerprint

POLL_SECONDS = 0.5


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / max(total, 1))
    return "#" * filled + "." * (width - filled) + f" {done}/{total}"


def wait_for(paths: list[Path], what: str, log, every: float = 30.0) -> None:
    """Block until every path exists (files other ranks write), logging how many are still missing."""
    last = time.monotonic()
    while missing := [p for p in paths if not p.exists()]:
        if time.monotonic() - last > every:
            log(f"tokenize: waiting for {len(missing)} {what} of other ranks (e.g. {missing[0].name})")
            last = time.monotonic()
        time.sleep(POLL_SECONDS)


def prepare_output(out: Path, vocabulary: Vocabulary, fp: str, visual: dict[str, Path], source: TokenizeSource,
                   geometry: Geometry, rank: int, text: AnyTextTokenizer) -> None:
    """Refuse a directory of another vocabulary; rank 0 records the vocabulary and copies the text tokenizer."""
    vocab_file = out / "vocab.json"
    previous = read_json(vocab_file)["fingerprint"] if vocab_file.exists() else fp
    if previous != fp:
        raise ValueError(f"{out} holds token shards of another vocabulary (fingerprint {previous} != {fp}); "
                         f"use a new output directory")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        # where the tokenizers came from: `loom convert to-hf --format emu3` packs them with the model, `loom
        # generate` decodes with this source's. The vocabulary keeps its file key "layout" (vocab.json and
        # manifest.json), so existing token shards still read
        record = {"layout": vocabulary.to_dict(), "fingerprint": fp, "image_size": geometry.size,
                  "geometry": vars(geometry), "visual_tokenizer": str(visual[source.visual].resolve())}
        if len(visual) > 1:  # the source's part, and every part's tokenizer (the fingerprint hashes them all)
            record |= {"visual": source.visual, "visual_tokenizers": [str(d.resolve()) for d in visual.values()]}
        write_json_atomic(vocab_file, record)
        text.copy_to(out)


def merge_source(out: Path, inputs: list[Path], vocabulary: Vocabulary, fp: str, counts: dict[str, dict]) -> dict:
    """The source's manifest.json (the loader reads it) from its files' counts (by input stem), with each shard's
    document count and size, from which the loader starts without opening a shard."""
    documents, tokens, skipped, shards, failed = 0, Counter(), Counter(), [], {}
    shard_documents, shard_bytes = [], []
    for path in inputs:
        stats = counts[path.stem]
        documents += stats["documents"]
        tokens.update(stats["tokens"])
        skipped.update(stats["skipped"]["by_reason"])
        if stats["output"]:
            shards.append(stats["output"])
            shard_documents.append(stats["documents"])
            shard_bytes.append(stats.get("bytes") or (out / stats["output"]).stat().st_size)
        if stats.get("failed"):
            failed[path.name] = stats["failed"]
    manifest = {"documents": documents, "tokens": dict(tokens), "skipped": dict(skipped), "failed_shards": failed,
                "shards": shards, "shard_documents": shard_documents, "shard_bytes": shard_bytes, "fingerprint": fp,
                "layout": vocabulary.to_dict()}
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


class JobFiles:
    """What ranks tell each other through the output directory (`OUT/.tokenize-job/`), in O(ranks) files: each rank's
    progress (a count) and, at its end, its summary (the counts of its input files), so rank 0 merges the
    manifests from W files and progress needs no listing of the outputs. Named after the work list, so files
    of a run over other inputs are never read."""

    def __init__(self, root: Path, work: list, world: int):
        self.folder = root / ".tokenize-job"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.digest = hashlib.sha1("\n".join(f"{src.name}/{path}" for src, path in work).encode()).hexdigest()[:12]
        self.world = world

    def summary(self, rank: int) -> Path:
        return self.folder / f"summary-{rank}-of-{self.world}-{self.digest}.json"

    def _progress(self, rank: int) -> Path:
        return self.folder / f"progress-{rank}-of-{self.world}-{self.digest}"

    def report_progress(self, rank: int, done: int) -> None:
        write_json_atomic(self._progress(rank), done)

    def progress(self) -> int:
        """Input files done by all ranks so far (those of this run's ranks that reported)."""
        return sum(read_json(p) for p in map(self._progress, range(self.world)) if p.exists())


def source_geometry(cfg: TokenizeConfig, source: TokenizeSource, visual) -> Geometry:
    """How the source's media are sized: the job's geometry with the source's limits, and the crop side of its
    visual tokenizer when it is one of more_visual_tokenizers (sides then multiples of that tokenizer's factor)."""
    geometry = source.filters.geometry(cfg.geometry)
    extra = {v.name: v for v in cfg.more_visual_tokenizers}.get(source.visual)
    if extra is None:
        return geometry
    try:
        return dataclasses.replace(geometry, size=extra.image_size or geometry.size, multiple=visual.spatial)
    except ValueError as e:
        raise ConfigError(f"more_visual_tokenizers ({extra.name}).image_size: {e}") from None


def encoder_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def run_tokenize(cfg: TokenizeConfig, rank: int = 0, world_size: int = 1, log=print, merged: bool = True) -> dict:
    """This rank's share of the job; rank 0 then waits for the others and returns the merged manifest
    (other ranks return {}). `merged=False` skips OUT/manifest.json (a single source written in place)."""
    root = Path(cfg.out_dir)
    text = load_text_tokenizer(cfg.text_tokenizer)
    dirs = {MAIN_PART: Path(cfg.visual_tokenizer)} | {v.name: Path(v.path) for v in cfg.more_visual_tokenizers}
    visual = {name: load_visual_tokenizer(d).to(encoder_device(cfg.device)) for name, d in dirs.items()}
    vocabulary = Vocabulary.with_parts(text.vocab_size, [(name, v.kind, v.codebook_size, tuple(v.scale_maps))
                                                         for name, v in visual.items()], text.bos_id, text.eos_id)
    fp = fingerprint(vocabulary, cfg.text_tokenizer, list(dirs.values()))
    geometry = {src.name: source_geometry(cfg, src, visual[src.visual]) for src in cfg.sources}
    inputs = {src.name: list_inputs(src) for src in cfg.sources}
    work = [(src, path) for src in cfg.sources for path in inputs[src.name]]
    mine = work[rank::world_size]
    for src in cfg.sources:
        prepare_output(root / src.name, vocabulary, fp, dirs, src, geometry[src.name], rank, text)
    wait_for([root / src.name / "vocab.json" for src in cfg.sources], "vocabulary files", log)

    drop: dict[tuple[str, Path], frozenset] = {}
    for src in (s for s in cfg.sources if s.filters.dedup):  # data_pipeline/dedup.py
        out = root / src.name
        for s, path in mine:
            if s is src:
                hash_file(src, path, out)
        files = [out / "hashes" / f"{p.stem}.npz" for p in inputs[src.name]]
        wait_for(files, f"hash files of source '{src.name}'", log)
        write_partition(files, rank, world_size)
        partitions = [partition_path(files, r, world_size) for r in range(world_size)]
        wait_for(partitions, f"duplicate partitions of source '{src.name}'", log)
        own = {out / "hashes" / f"{p.stem}.npz": p for s, p in mine if s is src}
        for f, keys in duplicate_keys(files, list(own), partitions).items():
            drop[(src.name, own[f])] = keys

    encoders = {src.name: DocumentEncoder(text, visual[src.visual], vocabulary, geometry[src.name], cfg.video_frames,
                                          part=vocabulary.part(src.visual))
                for src in cfg.sources}
    job = JobFiles(root, work, world_size)
    start, documents, counts = time.time(), 0, {}
    for n, (src, path) in enumerate(mine, 1):
        out = root / src.name
        if (out / f"tokens-{path.stem}.json").exists():
            log(f"tokenize: [rank {rank}] {src.name}/{path.name} already done, skipped")
            counts[f"{src.name}/{path.stem}"] = read_json(out / f"tokens-{path.stem}.json")
            job.report_progress(rank, n)
            continue
        with torch.inference_mode():
            stats = tokenize_shard(src, path, out, encoders[src.name], cfg.workers, cfg.max_consecutive_failures,
                                   drop.get((src.name, path), frozenset()))
        counts[f"{src.name}/{path.stem}"] = stats
        documents += stats["documents"]
        job.report_progress(rank, n)
        done = job.progress()
        failed = f", FAILED: {stats['failed']}" if stats["failed"] else ""
        log(f"tokenize: [rank {rank}/{world_size}] {progress_bar(n, len(mine))} {src.name}/{path.name}: "
            f"{stats['documents']} documents, {stats['tokens'].get('total', 0)} tokens, "
            f"{stats['skipped']['total']} skipped, encoder busy "
            f"{stats['encoder_seconds'] / max(stats['seconds'], 1e-9):.0%}{failed} | "
            f"{documents / max(time.time() - start, 1e-9):.1f} docs/s | all ranks {progress_bar(done, len(work))}")
    write_json_atomic(job.summary(rank), counts)
    if rank != 0:
        return {}
    wait_for([job.summary(r) for r in range(world_size)], "rank summaries", log)
    counts = {k: v for r in range(world_size) for k, v in read_json(job.summary(r)).items()}
    per_source = {src.name: merge_source(root / src.name, inputs[src.name], vocabulary, fp,
                                         {p.stem: counts[f"{src.name}/{p.stem}"] for p in inputs[src.name]})
                  for src in cfg.sources}
    if not merged:
        return next(iter(per_source.values()))
    total_tokens, skipped = Counter(), Counter()
    for m in per_source.values():
        total_tokens.update(m["tokens"])
        skipped.update(m["skipped"])
    manifest = {"documents": sum(m["documents"] for m in per_source.values()), "tokens": dict(total_tokens),
                "skipped": dict(skipped), "fingerprint": fp, "layout": vocabulary.to_dict(),
                "failed_shards": {f"{name}/{k}": v for name, m in per_source.items()
                                  for k, v in m["failed_shards"].items()},
                "sources": {name: {k: m[k] for k in ("documents", "tokens", "skipped", "shards")}
                            for name, m in per_source.items()}}
    write_json_atomic(root / "manifest.json", manifest)
    return manifest


def tokenize(raw_dirs: list[str | Path], out_dir: str | Path, text_model: str | Path, vq_dir: str | Path,
             geometry: Geometry | int, video_frames: int, rank: int = 0, world_size: int = 1, log=print,
             workers: int = 0) -> dict:
    """Loom raw-document shards of `raw_dirs` -> token shards in `out_dir` (one source, no merged manifest);
    returns its manifest. `geometry` sizes images and frames (an int: square crops of that side)."""
    out_dir = Path(out_dir)
    cfg = TokenizeConfig(out_dir=str(out_dir.parent), text_tokenizer=str(text_model), visual_tokenizer=str(vq_dir),
                         sources=[TokenizeSource(name=out_dir.name, format="loom", paths=[str(d) for d in raw_dirs])],
                         geometry=as_geometry(geometry), video_frames=video_frames, workers=workers)
    return run_tokenize(cfg, rank, world_size, log, merged=False)
