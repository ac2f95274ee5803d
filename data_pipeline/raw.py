"""Reading raw-document shards (docs/data.md, "Raw document format") into checked segments.

A raw document is one webdataset sample: a `json` member `{"segments": [...], ...}` where each
segment is `{"text": str}`, `{"image": member}` or `{"video": member}`, plus the media members it
names. Bad samples raise SampleError naming the shard, the key and the field; callers skip and
count them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

SEGMENT_KINDS = ("text", "image", "video")


class SampleError(ValueError):
    def __init__(self, where: str, reason: str, message: str):
        super().__init__(f"{where}: {message}")
        self.reason = reason


@dataclass
class Segment:
    kind: str           # "text" | "image" | "video"
    text: str = ""      # for text
    data: bytes = b""   # encoded media bytes for image / video


@dataclass
class SkipCounter:
    """Counts skipped samples and unreadable shards by reason; keeps the first message of each."""
    by_reason: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, message: str) -> None:
        self.by_reason[reason] += 1
        self.examples.setdefault(reason, message)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def merge(self, other: dict) -> None:
        """Add the counts of another counter's `as_dict()` (e.g. from another rank)."""
        self.by_reason.update(other["by_reason"])
        for reason, message in other["examples"].items():
            self.examples.setdefault(reason, message)

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.by_reason), "examples": self.examples}


def parse_document(sample: dict) -> list[Segment]:
    where = f"{sample.get('__shard__', '?')}:{sample['__key__']}"
    if "json" not in sample:
        raise SampleError(where, "missing_json", "sample has no .json member")
    try:
        meta = json.loads(sample["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError(where, "bad_json", f"json member is not valid UTF-8 JSON ({e})") from None
    segments = meta.get("segments") if isinstance(meta, dict) else None
    if not isinstance(segments, list) or not segments:
        raise SampleError(where, "no_segments", "json field 'segments' must be a non-empty list")
    out = []
    for i, seg in enumerate(segments):
        kinds = [k for k in SEGMENT_KINDS if isinstance(seg, dict) and k in seg]
        if len(kinds) != 1:
            raise SampleError(where, "bad_segment", f"segments[{i}] must have exactly one of "
                                                    f"'text', 'image', 'video': {seg!r}"[:300])
        kind = kinds[0]
        if kind == "text":
            if not isinstance(seg["text"], str):
                raise SampleError(where, "bad_segment", f"segments[{i}].text is not a string")
            out.append(Segment("text", text=seg["text"]))
        else:
            member = seg[kind]
            if member not in sample:
                raise SampleError(where, f"missing_{kind}", f"segments[{i}].{kind} names member "
                                                            f"'{member}', which the sample lacks")
            out.append(Segment(kind, data=sample[member]))
    return out
