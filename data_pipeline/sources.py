"""Readers of the input formats users bring (docs/data.md, "Point Loom at your data").

Every reader turns one input file into documents: `(key, segments)` with segments as in
raw.py (text, image bytes, video bytes). A bad sample comes out as a SampleError whose `reason`
is counted; an input file that cannot be read at all raises ShardError (samples read before the
damage are still delivered).

- `loom`: Loom raw-document shards (raw.py).
- `image_text`: webdataset shards as img2dataset writes them: `KEY.jpg|png|webp` with `KEY.txt`
  and/or `KEY.json` (caption in `caption_field`).
- `video_text`: the same with `KEY.mp4|webm|mkv|avi|mov` (WebVid-style shards).
- `interleaved`: `.jsonl` or `.parquet` rows. OBELICS layout: parallel lists `texts` and `images`;
  at each position exactly one is not null. MMC4 layout: `text_list` and `image_info` entries with
  `matched_text_index` (the image goes before that text). Images are paths, bytes, base64 text or
  `{"bytes": ..., "path": ...}` (what Hugging Face datasets store in parquet).
- `text`: `.jsonl` (one document per row, `text_field`) or `.txt` (per file, paragraph or line).
"""

from __future__ import annotations

import base64
import binascii
import glob
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from .raw import SampleError, Segment, parse_document
from .shards import ShardError, iter_samples, list_shards
from .tokenize_config import TokenizeSource

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov")
INPUT_SUFFIXES = {"loom": (".tar",), "image_text": (".tar",), "video_text": (".tar",),
                  "interleaved": (".jsonl", ".parquet"), "text": (".jsonl", ".txt")}

MMC4_COLUMNS = ["text_list", "image_info"]

Document = tuple[str, list[Segment]]


def list_inputs(source: TokenizeSource) -> list[Path]:
    """The source's input files in a fixed order; refuses missing paths and clashing output names."""
    suffixes = INPUT_SUFFIXES[source.format]
    files: list[Path] = []
    for pattern in source.paths:
        path = Path(pattern)
        if any(c in pattern for c in "*?["):
            matched = sorted(Path(p) for p in glob.glob(pattern))
        elif path.is_dir():
            matched = sorted(path.iterdir())
        elif path.is_file():
            matched = [path]
        else:
            raise ShardError(f"source '{source.name}': {pattern} not found")
        matched = [p for p in matched if p.suffix in suffixes]  # a glob or directory may hold other files
        if not matched:
            raise ShardError(f"source '{source.name}': no {'/'.join(suffixes)} files in {pattern}")
        files += matched
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems and stems[f.stem] != f:
            raise ShardError(f"source '{source.name}': {stems[f.stem]} and {f} would both write tokens-{f.stem}.tar; "
                             f"rename one or put them in two sources")
        stems[f.stem] = f
    return list(dict.fromkeys(files))


def read_input(source: TokenizeSource, path: Path) -> Iterator[Document | SampleError]:
    """Documents of one input file of `source`, and a SampleError for each bad sample."""
    if source.format == "loom":
        for sample in iter_samples(path):
            try:
                yield sample["__key__"], parse_document(sample)
            except SampleError as e:
                yield e
    elif source.format in ("image_text", "video_text"):
        kind = "image" if source.format == "image_text" else "video"
        for sample in iter_samples(path):
            try:
                yield sample["__key__"], media_caption_document(sample, kind, source)
            except SampleError as e:
                yield e
    elif source.format == "interleaved":
        columns = [source.texts_field, source.images_field] if source.layout == "obelics" else MMC4_COLUMNS
        rows = parquet_rows(path, columns) if path.suffix == ".parquet" else jsonl_rows(path)
        root = Path(source.image_root) if source.image_root else path.parent
        for i, row in enumerate(rows):
            try:
                yield f"{i:09d}", check_text(interleaved_document(row, source, root, f"{path}:{i}"),
                                             source, f"{path}:{i}")
            except SampleError as e:
                yield e
    else:
        for i, item in enumerate(text_units(path, source)):
            if isinstance(item, SampleError):
                yield item
                continue
            try:
                yield f"{i:09d}", check_text([Segment("text", text=item)], source, f"{path}:{i}")
            except SampleError as e:
                yield e


def documents_of(files: list[tuple[TokenizeSource, Path]], skipped) -> Iterator[Document]:
    """(`file:key`, segments) of (source, input file) pairs; bad samples and unreadable files are counted
    in `skipped` (a raw.SkipCounter)."""
    for source, path in files:
        try:
            for item in read_input(source, path):
                if isinstance(item, SampleError):
                    skipped.add(item.reason, str(item))
                else:
                    yield f"{path.name}:{item[0]}", item[1]
        except ShardError as e:
            skipped.add("unreadable_shard", str(e))


def iter_documents(directories, skipped) -> Iterator[Document]:
    """(`shard:key`, segments) of every readable document of Loom raw-shard directories."""
    source = TokenizeSource(name="raw", format="loom")
    return documents_of([(source, shard) for directory in directories for shard in list_shards(directory)], skipped)


def media_caption_document(sample: dict, kind: str, source: TokenizeSource) -> list[Segment]:
    where = f"{sample['__shard__']}:{sample['__key__']}"
    extensions = IMAGE_EXTENSIONS if kind == "image" else VIDEO_EXTENSIONS
    member = next((ext for ext in extensions if ext in sample), None)
    if member is None:
        raise SampleError(where, f"missing_{kind}", f"no .{'/.'.join(extensions)} member")
    if "txt" in sample:
        caption = utf8(sample["txt"], where, "txt")
    elif "json" in sample:
        try:
            meta = json.loads(utf8(sample["json"], where, "json"))
        except json.JSONDecodeError as e:
            raise SampleError(where, "bad_json", f"json member is not valid JSON ({e})") from None
        caption = meta.get(source.caption_field) if isinstance(meta, dict) else None
        if not isinstance(caption, str):
            raise SampleError(where, "missing_caption", f"no .txt member and no string field "
                                                        f"'{source.caption_field}' in the .json member")
    else:
        raise SampleError(where, "missing_caption", "no .txt or .json member holds a caption")
    check_length(caption, source, where)
    media = Segment(kind, data=sample[member])
    text = Segment("text", text=caption)
    return [media, text] if key_fraction(sample["__key__"]) < source.image_first_fraction else [text, media]


def key_fraction(key: str) -> float:
    """A number in [0, 1) fixed by the sample's key (per-sample choices that reruns repeat)."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2 ** 64


def utf8(data: bytes, where: str, member: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError(where, "bad_text", f"{member} is not valid UTF-8 ({e})") from None


def check_length(text: str, source: TokenizeSource, where: str) -> None:
    f = source.filters
    n = len(text.strip())
    if n < f.min_caption_chars:
        raise SampleError(where, "caption_too_short", f"text of {n} characters, under {f.min_caption_chars}")
    if f.max_caption_chars and n > f.max_caption_chars:
        raise SampleError(where, "caption_too_long", f"text of {n} characters, over {f.max_caption_chars}")


def check_text(segments: list[Segment], source: TokenizeSource, where: str) -> list[Segment]:
    check_length("".join(s.text for s in segments if s.kind == "text"), source, where)
    return segments


def jsonl_rows(path: Path) -> Iterator[dict | SampleError]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ShardError(f"{path}: cannot be read ({e})") from None
    with f:
        for i, line in enumerate(f):
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
            except UnicodeDecodeError as e:
                yield SampleError(where, "bad_text", f"line is not valid UTF-8 ({e})")
                continue
            except json.JSONDecodeError as e:
                yield SampleError(where, "bad_json", f"line is not valid JSON ({e})")
                continue
            yield row if isinstance(row, dict) else SampleError(where, "bad_json", "line is not a JSON object")


def parquet_rows(path: Path, columns: list[str]) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        missing = [c for c in columns if c not in table.schema_arrow.names]
        if missing:
            raise ShardError(f"{path}: no column {missing[0]!r} (columns: {', '.join(table.schema_arrow.names)})")
        for batch in table.iter_batches(batch_size=64, columns=columns):
            yield from batch.to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{path}: not a readable parquet file ({e})") from None


def interleaved_document(row: dict | SampleError, source: TokenizeSource, root: Path, where: str) -> list[Segment]:
    if isinstance(row, SampleError):
        raise row
    if source.layout == "mmc4":
        return mmc4_document(row, root, where)
    texts, images = row.get(source.texts_field), row.get(source.images_field)
    if not isinstance(texts, list) or not isinstance(images, list):
        raise SampleError(where, "bad_row", f"fields '{source.texts_field}' and '{source.images_field}' "
                                            f"must both be lists")
    if len(texts) != len(images):
        raise SampleError(where, "mismatched_lists", f"'{source.texts_field}' has {len(texts)} entries, "
                                                     f"'{source.images_field}' {len(images)}")
    segments = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if text is not None and image is not None:
            raise SampleError(where, "bad_row", f"position {i} holds both a text and an image")
        if text is not None:
            if not isinstance(text, str):
                raise SampleError(where, "bad_row", f"{source.texts_field}[{i}] is not a string")
            segments.append(Segment("text", text=text))
        elif image is not None:
            segments.append(Segment("image", data=image_bytes(image, root, f"{where}: {source.images_field}[{i}]")))
    if not segments:
        raise SampleError(where, "no_segments", "the row has no text and no image")
    return segments


def mmc4_document(row: dict, root: Path, where: str) -> list[Segment]:
    texts, infos = row.get("text_list"), row.get("image_info")
    if not isinstance(texts, list) or not isinstance(infos, list):
        raise SampleError(where, "bad_row", "fields 'text_list' and 'image_info' must both be lists")
    before: dict[int, list[dict]] = {}
    for k, info in enumerate(infos):
        index = info.get("matched_text_index") if isinstance(info, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(texts):
            raise SampleError(where, "mismatched_lists", f"image_info[{k}].matched_text_index={index!r} is not an "
                                                         f"index of text_list ({len(texts)} texts)")
        before.setdefault(index, []).append(info)
    segments = []
    for i, text in enumerate(texts):
        for info in before.get(i, []):
            image = info.get("image_base64") or info.get("image_name")
            segments.append(Segment("image", data=image_bytes(image, root, f"{where}: image_info of text {i}")))
        if not isinstance(text, str):
            raise SampleError(where, "bad_row", f"text_list[{i}] is not a string")
        segments.append(Segment("text", text=text))
    if not segments:
        raise SampleError(where, "no_segments", "the row has no text and no image")
    return segments


def image_bytes(image, root: Path, where: str) -> bytes:
    """An interleaved row's image entry -> encoded image bytes."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if not isinstance(image, str):
        raise SampleError(where, "bad_row", f"image entry of type {type(image).__name__}; expected a path or bytes")
    path = root / image
    if len(image) < 1024 and path.is_file():
        return path.read_bytes()
    try:
        return base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise SampleError(where, "missing_image", f"{path} not found (and not base64 image bytes)") from None


def text_units(path: Path, source: TokenizeSource) -> Iterator[str | SampleError]:
    """The documents of a .jsonl or .txt text file."""
    if path.suffix == ".jsonl":
        for i, row in enumerate(jsonl_rows(path)):
            if isinstance(row, SampleError):
                yield row
            elif not isinstance(row.get(source.text_field), str):
                yield SampleError(f"{path}:{i}", "missing_text", f"no string field '{source.text_field}'")
            else:
                yield row[source.text_field]
        return
    try:
        data = path.read_bytes() if source.txt_document == "file" else None
        f = open(path, "rb")
    except OSError as e:
        raise ShardError(f"{path}: cannot be read ({e})") from None
    with f:
        if data is not None:
            chunks: Iterator[bytes] = iter([data])
        elif source.txt_document == "line":
            chunks = (line.rstrip(b"\r\n") for line in f)
        else:
            chunks = paragraphs(f)
        for i, chunk in enumerate(c for c in chunks if c.strip()):
            try:
                yield chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                yield SampleError(f"{path}:{i}", "bad_text", f"not valid UTF-8 ({e})")


def paragraphs(lines) -> Iterator[bytes]:
    """Blank-line separated blocks of a binary file, without reading it whole."""
    block: list[bytes] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield b"".join(block).rstrip(b"\r\n")
            block = []
    if block:
        yield b"".join(block).rstrip(b"\r\n")


def content_hash(segments: list[Segment]) -> int:
    """64-bit hash of a document's texts and media bytes, in order (exact-duplicate removal)."""
    h = hashlib.blake2b(digest_size=8)
    for seg in segments:
        payload = seg.text.encode("utf-8", "surrogatepass") if seg.kind == "text" else seg.data
        h.update(seg.kind.encode() + len(payload).to_bytes(8, "little") + payload)
    return int.from_bytes(h.digest(), "little")
