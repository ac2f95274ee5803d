"""The shapes world: a small multimodal world with known truth (DESIGN §8).

Images of colored shapes with captions, short videos of a moving shape, interleaved documents and
plain text about them. Every document records its ground truth in `doc.json["truth"]`, so that
generation can later be scored by pixels (ShapesEval). Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .media import encode_mp4, encode_png
from .shards import ShardWriter, write_json_atomic

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 205, 30), "purple": (150, 60, 200)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27),
             "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
NUMBERS = {1: "a", 2: "two", 3: "three"}
BACKGROUND = (245, 245, 245)
DOC_KINDS = ("image", "video", "interleaved", "text")


@dataclass(frozen=True)
class WorldSpec:
    image_size: int = 32
    video_frames: int = 8
    video_fps: int = 8
    mix: tuple[float, float, float, float] = (0.45, 0.15, 0.15, 0.25)  # image, video, interleaved, text
    glyphs: int = 0
    """Scaling-law worlds: images show 'glyphs' (4x4 cell patterns, one per name) instead of the three shapes,
    the k-th drawn with probability ~ k^-glyph_zipf. Each glyph is one fact to learn, met at a Zipfian rate,
    so the image loss falls as a power law in data (Michaud et al. 2023, the quantization model) instead of
    converging once a few shapes are known. 0 keeps the plain shapes."""
    glyph_zipf: float = 1.2

    def __post_init__(self):
        if self.glyphs < 0 or self.glyphs == 1 or self.glyph_zipf <= 0:
            raise ValueError(f"glyphs must be 0 (the shapes) or 2 or more (a scene can show two), and glyph_zipf "
                             f"above 0 (got {self.glyphs}, {self.glyph_zipf})")


def plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def glyph_name(k: int) -> str:
    return f"glyph-{k}"


def glyph_cells(name: str) -> list[tuple[int, int]]:
    """The lit cells of a glyph's 4x4 grid: 5-11 cells, fixed by its name alone."""
    rng = random.Random(name)
    cells = [(i, j) for i in range(4) for j in range(4)]
    return sorted(rng.sample(cells, rng.randint(5, 11)))


def glyph_weights(glyphs: int, zipf: float) -> list[float]:
    return [(k + 1) ** -zipf for k in range(glyphs)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, cx: float, cy: float, r: float) -> None:
    fill = COLORS[color]
    if shape.startswith("glyph-"):
        cell = 2 * r / 4  # a glyph fills the same box as a square of radius r
        for i, j in glyph_cells(shape):
            x, y = cx - r + j * cell, cy - r + i * cell
            draw.rectangle([x, y, x + cell, y + cell], fill=fill)
    elif shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def render(objects: list[dict], size: int) -> np.ndarray:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        draw_shape(draw, o["shape"], o["color"], o["cx"] * size, o["cy"] * size, o["r"] * size)
    return np.asarray(img)


def group_objects(rng: random.Random, shape: str, color: str, count: int, position: str) -> list[dict]:
    """`count` equal objects around `position`, at least 0.07 of the image apart, so that pixels can
    count them (ShapesEval)."""
    px, py = POSITIONS[position]
    r = rng.choice((0.08, 0.09)) if count > 1 else rng.choice((0.1, 0.16))
    offsets = {1: [0.0], 2: [-0.15, 0.15], 3: [-0.25, 0.0, 0.25]}[count]
    horizontal = position in ("top", "bottom", "center")
    return [{"shape": shape, "color": color, "r": r,
             "cx": px + (dx if horizontal else 0.0), "cy": py + (0.0 if horizontal else dx)}
            for dx in offsets]


def group_caption(shape: str, color: str, count: int, position: str) -> str:
    """'two red squares on the left', 'a blue circle in the center'."""
    where = "in the center" if position == "center" else f"on the {position}" \
        if position in ("left", "right") else f"at the {position}"
    return f"{NUMBERS[count]} {color} {plural(shape, count)} {where}"


def pair_caption(s1: str, c1: str, p1: str, s2: str, c2: str, p2: str) -> str:
    return f"a {c1} {s1} on the {p1} and a {c2} {s2} on the {p2}"


def scene_shapes(rng: random.Random, spec: WorldSpec, n: int) -> list[str]:
    """`n` different shape names: the three shapes uniformly, or glyphs at their Zipfian rates."""
    if not spec.glyphs:
        return rng.sample(SHAPES, n)
    weights = glyph_weights(spec.glyphs, spec.glyph_zipf)
    picked: list[str] = []
    while len(picked) < n:
        name = glyph_name(rng.choices(range(spec.glyphs), weights=weights)[0])
        if name not in picked:
            picked.append(name)
    return picked


def image_scene(rng: random.Random, spec: WorldSpec = WorldSpec()) -> tuple[list[dict], str]:
    """Objects and a caption: one group ('two red squares on the left') or two objects apart."""
    if rng.random() < 0.3:
        (s1, s2), (c1, c2) = scene_shapes(rng, spec, 2), rng.sample(list(COLORS), 2)
        p1, p2 = rng.choice([("left", "right"), ("top", "bottom")])
        objects = group_objects(rng, s1, c1, 1, p1) + group_objects(rng, s2, c2, 1, p2)
        return objects, pair_caption(s1, c1, p1, s2, c2, p2)
    shape = scene_shapes(rng, spec, 1)[0] if spec.glyphs else rng.choice(SHAPES)  # choice: the same plain world
    color = rng.choice(list(COLORS))
    count = rng.choice((1, 1, 2, 3))
    position = rng.choice(list(POSITIONS))
    return group_objects(rng, shape, color, count, position), group_caption(shape, color, count, position)


def video_clip(rng: random.Random, spec: WorldSpec) -> tuple[np.ndarray, dict, str]:
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    direction = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    r = 0.12
    start = (0.5 - 0.3 * dx, 0.5 - 0.3 * dy)
    frames, path = [], []
    for t in range(spec.video_frames):
        f = t / max(spec.video_frames - 1, 1)
        cx, cy = start[0] + 0.6 * dx * f, start[1] + 0.6 * dy * f
        path.append([round(cx, 4), round(cy, 4)])
        frames.append(render([{"shape": shape, "color": color, "cx": cx, "cy": cy, "r": r}],
                             spec.image_size))
    caption = f"a {color} {shape} moves {direction}" if direction in ("up", "down") else \
        f"a {color} {shape} moves to the {direction}"
    truth = {"shape": shape, "color": color, "direction": direction, "r": r, "path": path}
    return np.stack(frames), truth, caption


FACTS = [
    "a square has four equal sides.", "a triangle has three corners.", "a circle has no corners.",
    "{color} is a common color here.", "every shape sits on a light gray background.",
    "shapes can move left, right, up or down.", "{color} {shape}s are easy to spot.",
    "a {shape} can be small or large.", "there are three kinds of shapes: circles, squares and triangles.",
    "the colors are red, green, blue, yellow and purple.", "a picture can show up to three shapes.",
]


def text_passage(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 6)):
        template = rng.choice(FACTS)
        sentences.append(template.format(color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES)))
    return " ".join(s[0].upper() + s[1:] for s in sentences)


def make_document(index: int, seed: int, spec: WorldSpec = WorldSpec()) -> dict:
    """One raw-document sample (see docs/data.md, "Raw document format"): `json` plus media members."""
    rng = random.Random(f"{seed}-{index}")
    kind = rng.choices(DOC_KINDS, weights=spec.mix)[0]
    sample: dict = {"__key__": f"{index:08d}"}
    segments: list[dict] = []
    truth: dict = {"kind": kind}
    if kind == "image":
        objects, caption = image_scene(rng, spec)
        sample["img0.png"] = encode_png(render(objects, spec.image_size))
        segments = [{"text": caption.capitalize() + "."}, {"image": "img0.png"}]
        truth.update(objects=objects, caption=caption)
    elif kind == "video":
        frames, clip_truth, caption = video_clip(rng, spec)
        sample["vid0.mp4"] = encode_mp4(frames, spec.video_fps)
        segments = [{"text": caption.capitalize() + "."}, {"video": "vid0.mp4"}]
        truth.update(clip_truth, caption=caption)
    elif kind == "interleaved":
        truth["images"] = []
        for i in range(rng.randint(2, 3)):
            objects, caption = image_scene(rng, spec)
            lead = "Here is" if i == 0 else rng.choice(["Next comes", "Then we see", "After that,"])
            sample[f"img{i}.png"] = encode_png(render(objects, spec.image_size))
            segments += [{"text": f"{lead} {caption}."}, {"image": f"img{i}.png"}]
            truth["images"].append({"objects": objects, "caption": caption})
        segments.append({"text": text_passage(rng)})
    else:
        segments = [{"text": text_passage(rng)}]
    sample["json"] = json.dumps({"segments": segments, "source": "shapes", "truth": truth},
                                sort_keys=True).encode()
    return sample


def write_world(out_dir, docs: int, seed: int, spec: WorldSpec = WorldSpec(), docs_per_shard: int = 200,
                progress=None) -> dict:
    """Write `docs` documents as raw shards `raw-XXXXX.tar` in `out_dir`; returns counts by kind."""
    counts = {k: 0 for k in DOC_KINDS}
    with ShardWriter(out_dir, "raw", docs_per_shard) as writer:
        for i in range(docs):
            sample = make_document(i, seed, spec)
            counts[json.loads(sample["json"])["truth"]["kind"]] += 1
            writer.write(sample)
            if progress is not None:
                progress.update(1)
    summary = {"documents": docs, "by_kind": counts, "seed": seed, "image_size": spec.image_size,
               "video_frames": spec.video_frames, "shards": len(writer.written)}
    if spec.glyphs:
        summary.update(glyphs=spec.glyphs, glyph_zipf=spec.glyph_zipf)
    write_json_atomic(f"{out_dir}/world.json", summary)
    return summary
