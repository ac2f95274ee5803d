"""The tokenize job's config tree (`loom data tokenize CONFIG [overrides]`).

Same conventions as the training config (pretrain/config.py): dataclasses with a doc per field,
YAML plus dotted overrides, validated before any process starts. Each source names a format
(data_pipeline/sources.py reads it) and writes its own token directory OUT/<name>, which a training
config lists under data.sources with a mixing weight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, build, doc, load_tree

from .media import Geometry
from .vocab import MAIN_PART

FORMATS = ("loom", "image_text", "video_text", "interleaved", "text")


@dataclass
class FilterConfig:
    min_side: int | None = doc("Images and video frames with a shorter side below this are skipped "
                               "(image_too_small); null: geometry.min_side.", None)
    max_source_pixels: int | None = doc("Images and frames over this many pixels are skipped before decoding "
                                        "(image_too_large); null: geometry.max_source_pixels.", None)
    max_aspect: float | None = doc("Long side over this many times the short side is skipped "
                                   "(image_aspect_ratio); null: geometry.max_aspect.", None)
    min_caption_chars: int = doc("Captions (image_text, video_text) and the text of interleaved and text "
                                 "documents shorter than this are skipped (caption_too_short).", 1)
    max_caption_chars: int = doc("... longer than this are skipped (caption_too_long); 0: no limit.", 0)
    dedup: bool = doc("Drop exact duplicates: documents whose text and media bytes hash the same as an "
                      "earlier document of this source (in input order) are skipped (duplicate).", False)

    def geometry(self, base: Geometry) -> Geometry:
        """`base` with this source's resolution limits."""
        limits = {k: getattr(self, k) for k in ("min_side", "max_source_pixels", "max_aspect")}
        return dataclasses.replace(base, **{k: v for k, v in limits.items() if v is not None})


@dataclass
class TokenizeSource:
    name: str = doc("Name of the source; its token shards go to OUT/<name>.")
    format: str = doc("'loom' (raw-document shards, docs/data.md 'Raw document format'), 'image_text' (img2dataset "
                      "webdataset shards), 'video_text' (webdataset video-caption shards), 'interleaved' "
                      "(OBELICS-style .jsonl/.parquet rows), 'text' (.jsonl or .txt).")
    paths: list[str] = doc("Input files, directories (all files of the format inside, sorted) or glob patterns.",
                           factory=list)
    caption_field: str = doc("image_text/video_text: the caption is the .txt member, else this field of the "
                             ".json member.", "caption")
    image_first_fraction: float = doc("image_text/video_text: share of pairs laid out media-then-caption "
                                      "(captioning) instead of caption-then-media (generation); chosen per "
                                      "sample from a hash of its key, so reruns agree.", 0.0)
    layout: str = doc("interleaved: 'obelics' (parallel lists `texts_field` / `images_field`, null where the other "
                      "modality sits) or 'mmc4' (`text_list` and `image_info` entries with `matched_text_index`, "
                      "each image placed before its matched text; bytes from `image_base64`, else the file "
                      "`image_name`).", "obelics")
    texts_field: str = doc("interleaved: the list of texts (null where an image sits).", "texts")
    images_field: str = doc("interleaved: the list of images (null where a text sits): a path (relative to "
                            "image_root, else to the input file), bytes, base64 text, or {bytes, path}.", "images")
    image_root: str = doc("interleaved: directory that relative image paths start from ('' = the input "
                          "file's directory).", "")
    text_field: str = doc("text (.jsonl): the field holding the document's text.", "text")
    txt_document: str = doc("text (.txt): what one document is: 'file', 'paragraph' (blank-line separated) or "
                            "'line'.", "paragraph")
    filters: FilterConfig = doc("What this source skips.", factory=FilterConfig)
    visual: str = doc("The visual tokenizer of this source's images and videos: 'main' (visual_tokenizer) or a "
                      "name in more_visual_tokenizers.", MAIN_PART)


@dataclass
class NamedVisualTokenizer:
    name: str = doc("Its name: sources pick it with `visual: NAME`; its ids are the vocabulary part NAME.")
    path: str = doc("Emu3VQVAE directory (token or scale kind), or a palette directory (`loom data palette`).")
    image_size: int = doc("Side of its sources' images and frames in crop mode (a palette's grid is the image "
                          "itself: 32 gives 1,024 tokens); 0: geometry.size.", 0)


@dataclass
class TokenizeConfig:
    out_dir: str = doc("Output: OUT/<source name>/ token shards + manifest.json per source, OUT/manifest.json "
                       "merged over sources.", "runs/tokens")
    text_tokenizer: str = doc("sentencepiece .model file (loom data text-tokenizer), or a transformers tokenizer "
                              "directory holding tokenizer.json (an existing LLM's: Llama 3, Qwen2, ...), whose ids "
                              "the vocabulary keeps and whose BOS/EOS it reuses.", "")
    visual_tokenizer: str = doc("Emu3VQVAE directory, or an Emu3ForConditionalGeneration directory.", "")
    more_visual_tokenizers: list[NamedVisualTokenizer] = doc(
        "Further visual tokenizers, for a vocabulary built to hold several visual kinds (e.g. VQ codes and palette "
        "colours, data_pipeline/vocab.py): their ids follow visual_tokenizer's, in this order.", factory=list)
    sources: list[TokenizeSource] = doc("Inputs, one entry per source.", factory=list)
    geometry: Geometry = doc("Size of images and video frames (and default resolution limits).",
                             factory=Geometry)
    video_frames: int = doc("Frames sampled uniformly from each video; a multiple of 4.", 8)
    device: str = doc("Where the visual encoder runs: 'auto' (this rank's GPU when there is one, else the CPU), "
                      "'cpu', 'cuda'.", "auto")
    workers: int = doc("Loader processes decoding media per rank. 0: the rank decodes itself, in a background "
                       "thread while a GPU encodes, inline when the CPU encodes (measured faster on a few cores: "
                       "a decoding thread slows the encoder's threads more than it saves).", 0)
    max_consecutive_failures: int = doc("A shard whose samples fail this many times in a row is marked failed in "
                                        "the manifest (what it wrote is kept) and the job moves on.", 100)
    nproc_per_node: int = doc("Processes `loom data tokenize` starts with torchrun when not already under it; "
                              "ranks split the input shards, results do not depend on their number.", 1)
    threads: int = doc("torch threads per process (0: cores / processes).", 0)


def validate_tokenize(cfg: TokenizeConfig) -> None:
    if not cfg.sources:
        raise ConfigError("sources: give at least one source, e.g. {name: laion, format: image_text, "
                          "paths: [/data/laion/*.tar]}")
    text = Path(cfg.text_tokenizer)
    if not cfg.text_tokenizer or not (text.is_file() or (text / "tokenizer.json").is_file()):
        raise ConfigError(f"text_tokenizer: neither a sentencepiece file nor a directory with tokenizer.json: "
                          f"{cfg.text_tokenizer!r}")
    if not cfg.visual_tokenizer or not Path(cfg.visual_tokenizer).is_dir():
        raise ConfigError(f"visual_tokenizer: directory not found: {cfg.visual_tokenizer!r}")
    visual = [MAIN_PART]
    for i, extra in enumerate(cfg.more_visual_tokenizers):
        where = f"more_visual_tokenizers[{i}]"
        if not extra.name or extra.name in visual:
            raise ConfigError(f"{where}.name={extra.name!r}: give each visual tokenizer a unique name other than "
                              f"{MAIN_PART}")
        if not Path(extra.path).is_dir():
            raise ConfigError(f"{where}.path: directory not found: {extra.path!r}")
        if extra.image_size < 0:
            raise ConfigError(f"{where}.image_size={extra.image_size}: give a side in pixels, or 0 for geometry.size")
        visual.append(extra.name)
    names = [s.name for s in cfg.sources]
    for i, src in enumerate(cfg.sources):
        where = f"sources[{i}] ({src.name})"
        if not src.name or "/" in src.name or names.count(src.name) > 1:
            raise ConfigError(f"{where}.name: give each source a unique name without '/'")
        if src.visual not in visual:
            raise ConfigError(f"{where}.visual='{src.visual}': use one of {', '.join(visual)} (more_visual_tokenizers "
                              f"names the others)")
        if src.format not in FORMATS:
            raise ConfigError(f"{where}.format='{src.format}': use one of {', '.join(FORMATS)}")
        if not src.paths:
            raise ConfigError(f"{where}.paths: give input files, directories or glob patterns")
        if src.layout not in ("obelics", "mmc4"):
            raise ConfigError(f"{where}.layout='{src.layout}': use obelics or mmc4")
        if src.txt_document not in ("file", "paragraph", "line"):
            raise ConfigError(f"{where}.txt_document='{src.txt_document}': use file, paragraph or line")
        if not 0 <= src.image_first_fraction <= 1:
            raise ConfigError(f"{where}.image_first_fraction={src.image_first_fraction}: use a fraction in [0, 1]")
        try:
            src.filters.geometry(cfg.geometry)
        except ValueError as e:
            raise ConfigError(f"{where}.filters: {e}") from None
    if cfg.video_frames % 4:
        raise ConfigError(f"video_frames={cfg.video_frames}: use a multiple of 4 (one latent frame per 4)")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device='{cfg.device}': use auto, cpu or cuda")
    if cfg.max_consecutive_failures < 1 or cfg.nproc_per_node < 1 or cfg.workers < 0:
        raise ConfigError("max_consecutive_failures and nproc_per_node must be >= 1, workers >= 0")


def build_sources(path: str | Path) -> list[TokenizeSource]:
    """Only the `sources` of a tokenize config (the tokenizer paths may not exist yet)."""
    sources = load_tree(path).get("sources") or []
    if not isinstance(sources, list) or not sources:
        raise ConfigError(f"{path}: 'sources' must be a non-empty list")
    return [build(TokenizeSource, s, f"sources[{i}]") for i, s in enumerate(sources)]


def load_tokenize_config(path: str | Path | None, overrides: list[str] = ()) -> TokenizeConfig:
    try:
        cfg = build(TokenizeConfig, load_tree(path, overrides))
    except ConfigError:
        raise
    except ValueError as e:  # Geometry's own checks
        raise ConfigError(f"geometry: {e}") from None
    validate_tokenize(cfg)
    return cfg
