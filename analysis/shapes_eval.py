"""ShapesEval: GenEval's categories on the shapes world, scored by pixels instead of a detector.

Prompts are captions the shapes world writes (data_pipeline/shapes.py), so their truth is known.
The generated image is segmented by the world's palette: every pixel takes the nearest palette
color if it is close enough, else counts as background; connected regions of one color above a
minimum area are objects, with a centroid and a shape read from their row widths (a square fills
its bounding box, a triangle widens downwards, a circle is neither).

    single_object      'A red circle on the left.'       one object, of that shape
    two_objects        'A red circle on the left and ...' two objects, of those shapes
    counting           'Three blue squares at the top.'  that many objects
    colors             'A green triangle in the center.' the largest object has that color
    position           'A red circle on the left and a blue square on the right.'
                                                         the red object lies left of the blue one
    color_attribution  same kind of prompt               the circle is red and the square blue
"""

from __future__ import annotations

import random

import numpy as np
from scipy import ndimage

from data_pipeline.shapes import BACKGROUND, COLORS, POSITIONS, SHAPES, group_caption, group_objects, pair_caption

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution")
COLOR_NAMES = list(COLORS)
PALETTE = np.array([COLORS[c] for c in COLOR_NAMES] + [BACKGROUND], dtype=np.float32)  # (6, 3)
MAX_COLOR_DISTANCE = 80.0   # RGB distance within which a pixel counts as a palette color
MIN_AREA_FRACTION = 0.005   # smaller regions are noise (a shape of the world covers >= 1.5% of the image)
RELATIONS = {"left": ("cx", 1), "right": ("cx", -1), "top": ("cy", 1), "bottom": ("cy", -1)}  # first vs second
RELATION_MARGIN = 0.1       # centroids must differ by this fraction of the image for left/right/top/bottom


def detect_objects(rgb: np.ndarray) -> list[dict]:
    """(H, W, 3) uint8 -> objects [{color, shape, cx, cy, area}], centroids in [0, 1], largest first."""
    h, w = rgb.shape[:2]
    distance = np.linalg.norm(rgb[:, :, None, :].astype(np.float32) - PALETTE, axis=-1)   # (H, W, 6)
    nearest = distance.argmin(-1)
    labels = np.where((nearest < len(COLOR_NAMES)) & (distance.min(-1) < MAX_COLOR_DISTANCE), nearest, -1)
    objects = []
    for index, color in enumerate(COLOR_NAMES):
        regions, count = ndimage.label(labels == index)
        for region, box in zip(range(1, count + 1), ndimage.find_objects(regions)):
            mask = regions[box] == region
            area = int(mask.sum())
            if area < MIN_AREA_FRACTION * h * w:
                continue
            ys, xs = np.nonzero(mask)
            objects.append({"color": color, "shape": classify_shape(mask), "area": area,
                            "cx": (box[1].start + xs.mean() + 0.5) / w, "cy": (box[0].start + ys.mean() + 0.5) / h})
    return sorted(objects, key=lambda o: -o["area"])


def classify_shape(mask: np.ndarray) -> str:
    """A region cropped to its bounding box -> 'square', 'triangle' or 'circle'."""
    if mask.mean() >= 0.9:
        return "square"
    widths = mask.sum(1).astype(np.float32)
    third = max(len(widths) // 3, 1)
    if widths[-third:].mean() >= 1.6 * widths[:third].mean():
        return "triangle"
    return "circle"


def make_prompts(category: str, n: int, seed: int = 0) -> list[dict]:
    """n prompts of a category: {category, prompt, objects (the world's rendering of the truth), expect}."""
    rng = random.Random(f"shapes-eval-{category}-{seed}")
    items = []
    for _ in range(n):
        if category in ("single_object", "colors", "counting"):
            shape, color, position = rng.choice(SHAPES), rng.choice(COLOR_NAMES), rng.choice(list(POSITIONS))
            count = rng.choice((2, 3)) if category == "counting" else 1
            objects = group_objects(rng, shape, color, count, position)
            caption = group_caption(shape, color, count, position)
            expect = {"single_object": {"shape": shape}, "colors": {"color": color},
                      "counting": {"count": count}}[category]
        else:
            (s1, s2), (c1, c2) = rng.sample(SHAPES, 2), rng.sample(COLOR_NAMES, 2)
            p1, p2 = rng.choice([("left", "right"), ("top", "bottom")])
            objects = group_objects(rng, s1, c1, 1, p1) + group_objects(rng, s2, c2, 1, p2)
            caption = pair_caption(s1, c1, p1, s2, c2, p2)
            expect = {"two_objects": {"shapes": sorted([s1, s2])},
                      "position": {"colors": [c1, c2], "relation": p1},
                      "color_attribution": {"colors_of": {s1: c1, s2: c2}}}[category]
        items.append({"category": category, "prompt": caption[0].upper() + caption[1:] + ".",
                      "objects": objects, "expect": expect})
    return items


def largest(objects: list[dict], key: str, value: str) -> dict | None:
    return next((o for o in objects if o[key] == value), None)  # objects come largest first


def score(item: dict, objects: list[dict]) -> bool:
    """Whether the detected objects satisfy the prompt of `item` (see the module docstring)."""
    category, expect = item["category"], item["expect"]
    if category == "single_object":
        return len(objects) == 1 and objects[0]["shape"] == expect["shape"]
    if category == "two_objects":
        return len(objects) == 2 and sorted(o["shape"] for o in objects) == expect["shapes"]
    if category == "counting":
        return len(objects) == expect["count"]
    if category == "colors":
        return bool(objects) and objects[0]["color"] == expect["color"]
    if category == "position":
        first, second = (largest(objects, "color", c) for c in expect["colors"])
        if first is None or second is None:
            return False
        axis, sign = RELATIONS[expect["relation"]]
        return sign * (second[axis] - first[axis]) > RELATION_MARGIN
    if category == "color_attribution":
        found = [largest(objects, "shape", s) for s in expect["colors_of"]]
        return all(o is not None and o["color"] == c for o, c in zip(found, expect["colors_of"].values()))
    raise ValueError(f"unknown ShapesEval category {category!r}; known: {', '.join(CATEGORIES)}")


def shapes_eval(generator, per_category: int, sampling, seed: int = 0, categories=CATEGORIES,
                batch_size: int = 32) -> dict:
    """Generate `per_category` images per category with `generator` (pretrain/generate.py) and score
    them. Returns {accuracy: {category: fraction, overall: mean over categories}, samples: [...]},
    each sample with its prompt, correctness, detected objects and pixels (key 'image')."""
    from dataclasses import replace

    accuracy, samples = {}, []
    for category in categories:
        items = make_prompts(category, per_category, seed)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            images = generator.images([it["prompt"] for it in chunk], replace(sampling, seed=sampling.seed + start))
            for item, image in zip(chunk, images):
                objects = detect_objects(image)
                samples.append({"category": category, "prompt": item["prompt"], "correct": bool(score(item, objects)),
                                "detected": objects, "image": image})
        results = [s["correct"] for s in samples if s["category"] == category]
        accuracy[category] = sum(results) / len(results)
    accuracy["overall"] = sum(accuracy[c] for c in categories) / len(categories)
    return {"accuracy": accuracy, "samples": samples}


def format_table(accuracy: dict, per_category: int) -> str:
    lines = [f"{'category':<18} {'accuracy':>8}   (n = {per_category} per category)"]
    lines += [f"{name:<18} {100 * value:>7.1f}%" for name, value in accuracy.items()]
    return "\n".join(lines)
