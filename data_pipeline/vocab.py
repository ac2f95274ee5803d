"""The unified vocabulary (DESIGN §2): text pieces, then special tokens, then visual codes.

    ids [0, T)          the text tokenizer's ids: sentencepiece pieces (byte fallback on), or a transformers
                        tokenizer's own ids, its added tokens included (an existing LLM's vocabulary)
        [T, T+S)        special tokens (SPECIAL_TOKENS, in this order; without <|bos|> / <|eos|> when the
                        text tokenizer has its own, which documents then start / end with)
        [T+S, T+S+K)    visual codes 0..K-1, named <|visual token 000123|>: VQ codes (visual_kind "token"),
                        palette colours, one per pixel (visual_kind "pixel", data_pipeline/palette.py), or the
                        codes of a multi-scale residual VQ (visual_kind "scale", with its `scale_maps`)
                        A vocabulary built to hold several visual tokenizers (`visual_parts`, visual_kind
                        "mixed") splits this range into one part per tokenizer, in order: e.g. VQ codes, then
                        palette colours. Each source's media use one part (the tokenize config's `visual`).
    the model pads the embedding to a multiple of model.vocab_pad_multiple (not part of the vocabulary)

The sequence format of images and videos (DocumentEncoder in data_pipeline/tokenize.py writes it):
image: <|image start|> "{h}*{w}" <|image token|> row_1 <|eol|> ... row_h <|eol|> <|eof|> <|image end|>
video: <|video start|> "{t}*{h}*{w}" <|image token|> frame_1 ... frame_t <|video end|>,
       each frame laid out as the rows of an image followed by <|eof|>
scale kind: a frame is its maps coarse to fine, each after a <|scale|> marker, then <|eof|>:
       <|scale|> map_1 ... <|scale|> map_K <|eof|>, each map's codes row-major. The marker takes the id of
       <|reserved 1|> (<|reserved 0|> is the Emu3 export's image placeholder).

The fingerprint hashes the vocabulary, the text tokenizer's files and the VQ weights (or the palette): token shards and
checkpoints record it, and training refuses data whose fingerprint differs from the model's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|image start|>", "<|image end|>",
                  "<|image token|>", "<|eol|>", "<|eof|>", "<|video start|>", "<|video end|>",
                  *(f"<|reserved {i}|>" for i in range(6)))

SCALE_MARKER = "<|scale|>"  # before each token map of the scale kind (in place of <|reserved 1|>)

# Loss kinds of a target token (the loader's `loss_kind`; 0 means no loss on that position).
IGNORE, TEXT, IMAGE, VIDEO, VISUAL_STRUCTURE = 0, 1, 2, 3, 4
MAX_SCALE_MAPS = 16
IMAGE_MAP = 5  # IMAGE_MAP + k: an image code of next-scale map k + 1 (data_pipeline/next_scale.py)
LOSS_KIND_NAMES = {TEXT: "text", IMAGE: "image", VIDEO: "video", VISUAL_STRUCTURE: "visual_structure",
                   **{IMAGE_MAP + k: f"image_map_{k + 1}" for k in range(MAX_SCALE_MAPS)}}
NUM_LOSS_KINDS = len(LOSS_KIND_NAMES) + 1
# the kinds a logged loss averages over: "image" is every image code, of one map or of any next-scale map
LOSS_KIND_MEMBERS = {kind: (kind,) for kind in LOSS_KIND_NAMES} | {
    IMAGE: (IMAGE, *(IMAGE_MAP + k for k in range(MAX_SCALE_MAPS)))}


@dataclass(frozen=True)
class VisualPart:
    """One visual tokenizer's ids in the vocabulary: [offset, offset + size)."""
    name: str  # "main" (the tokenize config's visual_tokenizer), or its name in more_visual_tokenizers
    kind: str  # "token", "pixel" or "scale"
    offset: int
    size: int
    scale_maps: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.offset + self.size

    def holds(self, ids: np.ndarray) -> np.ndarray:
        return (ids >= self.offset) & (ids < self.end)


MAIN_PART = "main"


@dataclass(frozen=True)
class Vocabulary:
    text_size: int
    codebook_size: int
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS
    text_bos: int | None = None  # the text tokenizer's BOS id, used instead of <|bos|>; None: it has none
    text_eos: int | None = None  # ... its EOS id
    visual_kind: str = "token"  # what a visual id stands for: "token" (a VQ code), "pixel" (a palette colour)
    #                             or "scale" (a code of a multi-scale residual VQ)
    scale_maps: tuple[int, ...] = ()  # the scale kind's map sides, coarse to fine
    # a vocabulary of several visual tokenizers (visual_kind "mixed", codebook_size their sum): each one's
    # (name, kind, size, scale_maps), in id order; empty: one tokenizer, of visual_kind
    visual_parts: tuple[tuple[str, str, int, tuple[int, ...]], ...] = ()

    @classmethod
    def for_text(cls, text_size: int, codebook_size: int, text_bos: int | None = None,
                 text_eos: int | None = None, visual_kind: str = "token",
                 scale_maps: tuple[int, ...] = ()) -> "Vocabulary":
        """The layout over a text tokenizer of `text_size` ids, reusing its BOS/EOS where it has them."""
        reused = {"<|bos|>": text_bos, "<|eos|>": text_eos}
        specials = tuple(t for t in SPECIAL_TOKENS if reused.get(t) is None)
        if visual_kind == "scale":
            specials = tuple(SCALE_MARKER if t == "<|reserved 1|>" else t for t in specials)
        return cls(text_size, codebook_size, specials, text_bos, text_eos, visual_kind, tuple(scale_maps))

    @classmethod
    def with_parts(cls, text_size: int, parts: list[tuple[str, str, int, tuple[int, ...]]],
                   text_bos: int | None = None, text_eos: int | None = None) -> "Vocabulary":
        """The layout over several visual tokenizers, (name, kind, size, scale_maps) each, the first named "main".
        One part is the plain layout of its kind (`for_text`), so a single tokenizer's vocabulary is unchanged."""
        names, kinds = [p[0] for p in parts], [p[1] for p in parts]
        if not parts or names[0] != MAIN_PART or len(set(names)) != len(names):
            raise ValueError(f"visual parts {names}: the first is '{MAIN_PART}', and each name is unique")
        if kinds.count("scale") > 1:
            raise ValueError(f"visual parts {names} hold {kinds.count('scale')} scale-kind tokenizers; one "
                             f"<|scale|> layout per vocabulary: give it at most one")
        if len(parts) == 1:
            return cls.for_text(text_size, parts[0][2], text_bos, text_eos, kinds[0], parts[0][3])
        scale_maps = next((tuple(p[3]) for p in parts if p[1] == "scale"), ())
        specials = cls.for_text(text_size, sum(p[2] for p in parts), text_bos, text_eos,
                                "scale" if scale_maps else "token")  # <|scale|> in place of <|reserved 1|> if any
        return replace(specials, visual_kind="mixed", scale_maps=scale_maps,
                       visual_parts=tuple((name, kind, size, tuple(maps)) for name, kind, size, maps in parts))

    @property
    def parts(self) -> list[VisualPart]:
        """The visual tokenizers' id ranges, in order (one, named "main", unless built `with_parts`)."""
        if not self.visual_parts:
            return [VisualPart(MAIN_PART, self.visual_kind, self.visual_offset, self.codebook_size, self.scale_maps)]
        out, offset = [], self.visual_offset
        for name, kind, size, maps in self.visual_parts:
            out.append(VisualPart(name, kind, offset, size, tuple(maps)))
            offset += size
        return out

    def part(self, name: str) -> VisualPart:
        parts = {p.name: p for p in self.parts}
        if name not in parts:
            raise ValueError(f"the vocabulary has no visual part '{name}'; it has {', '.join(parts)}")
        return parts[name]

    @property
    def kinds(self) -> set[str]:
        return {p.kind for p in self.parts}

    @property
    def visual_offset(self) -> int:
        return self.text_size + len(self.special_tokens)

    @property
    def size(self) -> int:
        return self.visual_offset + self.codebook_size

    def special(self, name: str) -> int:
        return self.text_size + self.special_tokens.index(name)

    @property
    def bos(self) -> int:
        return self.special("<|bos|>") if self.text_bos is None else self.text_bos

    @property
    def eos(self) -> int:
        return self.special("<|eos|>") if self.text_eos is None else self.text_eos

    def is_visual(self, ids: np.ndarray) -> np.ndarray:
        return ids >= self.visual_offset

    def to_dict(self) -> dict:
        d = asdict(self)
        d["special_tokens"] = list(self.special_tokens)
        d["scale_maps"] = list(self.scale_maps)
        d["visual_parts"] = [{"name": name, "kind": kind, "size": size, **({"scale_maps": list(maps)} if maps else {})}
                             for name, kind, size, maps in self.visual_parts]
        # absent rather than null (or "token", or []): the layouts and fingerprints of earlier vocabularies stay
        return {k: v for k, v in d.items()
                if v is not None and v != [] and not (k == "visual_kind" and v == "token")}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        return cls(d["text_size"], d["codebook_size"], tuple(d["special_tokens"]), d.get("text_bos"),
                   d.get("text_eos"), d.get("visual_kind", "token"), tuple(d.get("scale_maps", ())),
                   tuple((p["name"], p["kind"], p["size"], tuple(p.get("scale_maps", ())))
                         for p in d.get("visual_parts", ())))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# How text segments become ids (data_pipeline/text_tokenizer.py); part of the fingerprint, so that token shards
# and checkpoints made with another encoding of the same tokenizer file are refused by name.
TEXT_ENCODING = "segments without dummy prefix, identity normalization, whitespace kept"
TRANSFORMERS_TEXT_ENCODING = "transformers tokenizer, segments encoded without its special tokens"


def fingerprint(vocabulary: Vocabulary, text_model: str | Path, vq_dir: str | Path | list) -> str:
    """sha256 over the vocabulary, the text encoding, the text tokenizer's file(s) (a sentencepiece file, or every
    file of a transformers tokenizer directory, by name) and the VQ weight files (first 16 hex digits); `vq_dir`
    is a list of directories, in part order, for a vocabulary of several visual tokenizers."""
    h = hashlib.sha256(json.dumps(vocabulary.to_dict(), sort_keys=True).encode())
    text_model = Path(text_model)
    if text_model.is_dir():
        h.update(TRANSFORMERS_TEXT_ENCODING.encode())
        for f in sorted(p for p in text_model.iterdir() if p.is_file()):
            h.update(f"{f.name}:{_file_digest(f)}".encode())
    else:
        h.update(TEXT_ENCODING.encode())
        h.update(_file_digest(text_model).encode())
    for directory in vq_dir if isinstance(vq_dir, list) else [vq_dir]:
        for weights in sorted(Path(directory).glob("*.safetensors")):
            h.update(_file_digest(weights).encode())
    return h.hexdigest()[:16]
