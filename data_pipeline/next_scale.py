"""Next-scale prediction inside a document (VAR's training, Tian et al. 2024, in Loom's discrete sequence).

The tokenize job stores a scale-kind frame as `M c_1 M c_2 ... M c_K <|eof|>` (M = <|scale|>, c_k map k's
codes row-major; data_pipeline/vocab.py). For training, `NextScaleLayout.rewrite` rewrites a document so that all
codes of map k are predicted at once from the coarser maps only:

- **Block k** is the n_k positions from map k's marker on. Shifted by one as for any token, their targets are
  exactly c_k. Their inputs are map k-1 upsampled (nearest) to map k's grid (VAR feeds the accumulated
  feature map of maps < k, resized; here the code ids of map k-1 go through the model's own embedding, and
  the maps before it are in earlier blocks); block 1's inputs are its marker.
- **Attention**: every position of block k sees the whole block and everything before it (`reach`: how many
  positions past itself a position sees; the loader turns it into the row's `horizon`, pretrain/attention.py).
  The position after block k (input c_k's last code, target the next marker) is causal.
- **Loss kinds**: an image code of map k is `image_map_k` (logged per map and together as `image`); video
  codes stay `video`.
- **The view block**: no input holds the finest map (block K's inputs are map K-1), so after c_K the rewrite
  inserts `M c_K` whose inputs are c_K itself and whose targets carry no loss: what follows the image (its
  <|eof|>, later text, the next video frame) sees the whole image.

So no position's input depends on a code it predicts or on a finer map (tested: changing map k leaves the
logits of blocks <= k unchanged). Maps are square (VAR's): the finest side is sqrt(n_K), map k's side is
`scale_maps[k]` scaled to it, as `VisualTokenizer.map_shapes` gives.
"""

from __future__ import annotations

import math

import numpy as np

from .vocab import IGNORE, IMAGE, IMAGE_MAP, MAX_SCALE_MAPS, SCALE_MARKER, Vocabulary


def map_sides(scale_maps: tuple[int, ...] | list[int], side: int) -> list[int]:
    """The side of each map along a frame side of `side` latent cells: `scale_maps` scaled so the last is `side`."""
    return [max(1, round(side * s / scale_maps[-1])) for s in scale_maps]


def upsample_nearest(codes: np.ndarray, side: int, to: int) -> np.ndarray:
    """Row-major codes of a side x side map -> of a to x to map, each cell taking the code of the cell it lies in."""
    index = np.arange(to) * side // to
    return codes.reshape(side, side)[index][:, index].reshape(-1)


class NextScaleLayout:
    """Rewrites the documents of a vocabulary with a scale-kind part into their training form (`rewrite`); the
    frames of its other parts (a vocabulary of several kinds) stay as they are."""

    def __init__(self, vocabulary: Vocabulary):
        self.part = next(p for p in vocabulary.parts if p.kind == "scale")
        self.scale_maps = self.part.scale_maps
        if len(self.scale_maps) > MAX_SCALE_MAPS:
            raise ValueError(f"{len(self.scale_maps)} scale maps: at most {MAX_SCALE_MAPS} have a loss kind")
        self.marker = vocabulary.special(SCALE_MARKER)
        self.eof = vocabulary.special("<|eof|>")

    def _frame(self, tokens: np.ndarray, start: int) -> tuple[list[np.ndarray], int]:
        """The maps of the frame whose first marker is at `start`, and the position of its <|eof|>."""
        maps, i = [], start
        for _ in self.scale_maps:
            if i >= len(tokens) or tokens[i] != self.marker:
                raise ValueError(f"position {i}: a scale-kind frame needs {len(self.scale_maps)} maps, each after "
                                 f"<|scale|>; found {len(maps)}")
            end = i + 1
            while end < len(tokens) and self.part.offset <= tokens[end] < self.part.end:
                end += 1
            maps.append(tokens[i + 1:end])
            i = end
        if i >= len(tokens) or tokens[i] != self.eof:
            raise ValueError(f"position {i}: a scale-kind frame ends with <|eof|> after its last map")
        side = math.isqrt(len(maps[-1]))
        if [len(m) for m in maps] != [s * s for s in map_sides(self.scale_maps, side)]:
            raise ValueError(f"position {start}: map sizes {[len(m) for m in maps]} are not the square maps "
                             f"{self.scale_maps} of a {side}x{side} grid")
        return maps, i

    def rewrite(self, tokens: np.ndarray, kinds: np.ndarray) -> tuple[np.ndarray, ...]:
        """(tokens, kinds) of a stored document -> (tokens, kinds, inputs, reach) of its training form, where
        `inputs` is each position's input id (targets stay `tokens` shifted by one) and `reach` how many positions
        past itself a position sees. ValueError names the position of a malformed frame."""
        out: dict[str, list] = {"tokens": [], "kinds": [], "inputs": [], "reach": []}

        def put(tok, kind, inputs, reach):
            for key, value in (("tokens", tok), ("kinds", kind), ("inputs", inputs), ("reach", reach)):
                out[key].append(np.asarray(value, dtype=np.int64))

        done = 0
        for start in np.flatnonzero(tokens == self.marker):
            if start < done:
                continue  # a marker of the frame just rewritten
            put(tokens[done:start], kinds[done:start], tokens[done:start], np.zeros(start - done))
            maps, eof = self._frame(tokens, int(start))
            sides = map_sides(self.scale_maps, math.isqrt(len(maps[-1])))
            at, previous = int(start), None
            for k, codes in enumerate(maps):
                n = len(codes)
                block = [self.marker] * n if k == 0 else upsample_nearest(previous, sides[k - 1], sides[k])
                kind = kinds[at:at + n + 1]
                put(tokens[at:at + n + 1], np.where(kind == IMAGE, IMAGE_MAP + k, kind), np.r_[block, codes[-1]],
                    np.r_[np.arange(n)[::-1], 0])
                at, previous = at + n + 1, codes
            view = np.r_[self.marker, maps[-1]]
            put(view, np.full(len(view), IGNORE), np.r_[maps[-1], maps[-1][-1]], np.zeros(len(view)))
            done = eof
        put(tokens[done:], kinds[done:], tokens[done:], np.zeros(len(tokens) - done))
        tokens, kinds, inputs, reach = (np.concatenate(out[k]) for k in ("tokens", "kinds", "inputs", "reach"))
        return tokens, kinds.astype(np.int8), inputs, reach
