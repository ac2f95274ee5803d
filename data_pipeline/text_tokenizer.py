"""The text tokenizer: sentencepiece BPE with byte fallback, trained on the text of raw shards, or an existing
LLM's transformers tokenizer (a directory with tokenizer.json: Llama 3, Qwen2, ...), whose ids the vocabulary keeps.

Every text segment of a document follows a special token (<|bos|>, <|image end|>, ...) and is encoded the
way transformers' tokenizer of an exported model encodes text after a special token: no dummy prefix
("A red circle" -> `A ▁red ▁circle`, the grid "8*8" -> `8 * 8`, as in Emu3's own sequences), no
normalization and no whitespace collapsing (the exported tokenizer has neither). So the ids Loom trains
on are the ids transformers' Emu3Processor builds (tests/test_convert.py). A tokenizer model trained by
an earlier Loom is read the same way; the vocabulary fingerprint says so (vocab.TEXT_ENCODING).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from .raw import SkipCounter
from .sources import documents_of, iter_documents, list_inputs


# The name a token directory stores its text tokenizer under: a sentencepiece file or a transformers directory.
SENTENCEPIECE_FILE, TRANSFORMERS_DIR = "text_tokenizer.model", "text_tokenizer"


class TextTokenizer:
    """Thin wrapper so the rest of Loom does not depend on sentencepiece's API directly."""

    # sentencepiece models trained by Loom have no BOS/EOS piece: Loom's own specials mark documents
    bos_id = eos_id = None

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"text tokenizer not found: {self.path}")
        self.sp = spm.SentencePieceProcessor(model_proto=segment_encoding(self.path.read_bytes()))

    def copy_to(self, folder: Path) -> None:
        """Into a token directory, as `stored_text_tokenizer` finds it."""
        shutil.copy(self.path, folder / SENTENCEPIECE_FILE)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class TransformersTextTokenizer:
    """A transformers tokenizer directory (AutoTokenizer: tokenizer.json and its config). Text segments are
    encoded without the tokenizer's own special tokens (add_special_tokens=False): Loom places BOS/EOS itself,
    reusing the tokenizer's where it has them (vocab.Vocabulary.text_bos/text_eos)."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self.path = Path(folder)
        if not (self.path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"text tokenizer not found: {self.path}/tokenizer.json (a transformers tokenizer "
                                    f"directory, as `tokenizer.save_pretrained` writes)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.bos_id, self.eos_id = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id

    def copy_to(self, folder: Path) -> None:
        """Into a token directory, as `stored_text_tokenizer` finds it."""
        shutil.copytree(self.path, folder / TRANSFORMERS_DIR, dirs_exist_ok=True)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)  # its base vocabulary and its added tokens: every id it can produce

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


AnyTextTokenizer = TextTokenizer | TransformersTextTokenizer


def load_text_tokenizer(path: str | Path) -> AnyTextTokenizer:
    """A sentencepiece .model file, or a transformers tokenizer directory."""
    return TransformersTextTokenizer(path) if Path(path).is_dir() else TextTokenizer(path)


def stored_text_tokenizer(token_dir: str | Path) -> Path:
    """The text tokenizer a token directory was written with (`loom data tokenize` copies it there)."""
    for name in (SENTENCEPIECE_FILE, TRANSFORMERS_DIR):
        if (Path(token_dir) / name).exists():
            return Path(token_dir) / name
    raise FileNotFoundError(f"{token_dir} holds no text tokenizer ({SENTENCEPIECE_FILE} or {TRANSFORMERS_DIR}/): "
                            f"not a directory written by `loom data tokenize`")


def segment_encoding(model: bytes) -> bytes:
    """The sentencepiece model with the encoding of text segments: no dummy prefix, identity normalization,
    whitespace kept (what the exported transformers tokenizer does after a special token)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    spec = proto.normalizer_spec
    spec.add_dummy_prefix, spec.remove_extra_whitespaces = False, False
    spec.name, spec.precompiled_charsmap = "identity", b""
    return proto.SerializeToString()


def train_text_tokenizer(raw_dirs: list[str | Path], out_dir: str | Path, vocab_size: int = 512,
                         max_sentences: int = 200_000, sources: list = ()) -> dict:
    """Train on the text segments of the raw shards in `raw_dirs`, or of the tokenize sources
    (data_pipeline.tokenize_config.TokenizeSource, any format), up to `max_sentences`; writes
    `out_dir/text_tokenizer.model`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped = SkipCounter()
    sentences = []
    if sources:
        documents = documents_of([(src, path) for src in sources for path in list_inputs(src)], skipped)
    else:
        documents = iter_documents(raw_dirs, skipped)
    for _, segments in documents:
        sentences += [s.text for s in segments if s.kind == "text" and s.text.strip()]
        if len(sentences) >= max_sentences:
            break
    if not sentences:
        where = ", ".join(map(str, raw_dirs)) if not sources else ", ".join(s.name for s in sources)
        raise ValueError(f"no text found in {where}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe",
        # characters past 99.95% coverage are spelt in bytes (byte fallback): un-normalized text has many rare ones
        vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9995, hard_vocab_limit=False,
        # Loom's own special tokens live after the text vocabulary (DESIGN §2); sentencepiece keeps
        # only <unk>, so its ids are exactly the text pieces.
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, split_digits=True, num_threads=2,
        # segments are encoded as they are (TextTokenizer): learn the pieces of that encoding
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        # digits and '*' spell the image grid prefix "{h}*{w}" (DESIGN §2)
        required_chars="0123456789*",
        minloglevel=2)
    path = out_dir / "text_tokenizer.model"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)
    tok = TextTokenizer(path)
    return {"path": str(path), "vocab_size": tok.vocab_size, "sentences": len(sentences),
            "skipped": skipped.as_dict()}
