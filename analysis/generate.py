"""Sampling from a checkpoint: text, text-to-image, image-to-text and text-to-video.

One process: a checkpoint of any training layout is consolidated into the single-process
Transformer (pretrain/nll.load_model). A KV cache makes every new token cost one position;
`use_cache=False` recomputes the whole sequence at every step (the tests compare the two).

Images and videos follow the sequence format of data_pipeline/vocab.py by construction: the
prompt ends with `<|image start|> "{h}*{w}" <|image token|>` and a template then forces every
structural token (eol after each w codes, eof, the end token) and lets the model choose only among
visual codes in between, so every sample is a decodable grid of the asked size. Classifier-free
guidance runs the prompt and a negative prompt as one batch and mixes their logits.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from checkpoints_utils.convert import data_vocabulary, locate_visual_tokenizer
from data_pipeline.media import decode_image, encode_mp4, encode_png
from data_pipeline.text_tokenizer import AnyTextTokenizer, load_text_tokenizer, stored_text_tokenizer
from data_pipeline.tokenize import DocumentEncoder
from data_pipeline.visual_tokenizer import load_visual_tokenizer
from data_pipeline.vocab import MAIN_PART, Vocabulary
from pretrain.model import KVCache, Transformer
from pretrain.parallel import tensor_parallel_of
from .nll import load_model
from .sampling import Sampling, guide, left_pad, next_tokens
from .scale_sampling import sample_maps

VISUAL = -1  # a template slot where the model picks any visual code


@torch.no_grad()
def sample_tokens(model: Transformer, prompts: list[list[int]], template: list[int] | None, free_mask: torch.Tensor,
                  s: Sampling, pad: int, stop: int | None = None, uncond: list[list[int]] | None = None,
                  use_cache: bool = True) -> torch.Tensor:
    """Continue each prompt; returns the new tokens (n, steps).

    template: one entry per new token, a forced id or VISUAL (choose among `free_mask`, a bool (v,)
    over the model's vocabulary); None: every token is free, up to s.max_new_tokens or `stop` in
    every row. uncond: prompts of the guidance branch (one per prompt), mixed with s.cfg_scale.
    """
    n = len(prompts)
    device = next(model.parameters()).device
    steps = len(template) if template is not None else s.max_new_tokens
    rows = prompts + (uncond or [])
    tokens, positions, doc_ids = left_pad(rows, pad, device)
    generator = torch.Generator().manual_seed(s.seed)
    cfg = model.cfg
    cache = KVCache(cfg.n_layers, len(rows), tokens.shape[1] + steps, cfg.n_kv_heads, cfg.head_dim,
                    next(model.parameters()).dtype, device) if use_cache else None
    logits = model(tokens, positions, doc_ids, cache)[-1]                  # (rows, v): the next token's
    free_mask = free_mask.to(device)
    out, done = [], torch.zeros(n, dtype=torch.bool, device=device)
    for i in range(steps):
        if template is not None and template[i] != VISUAL:
            token = torch.full((n,), template[i], dtype=torch.long, device=device)
        else:
            scores = logits[:n].float()
            if uncond:
                scores = guide(scores, logits[n:].float(), s.cfg_scale)
            token = next_tokens(scores.masked_fill(~free_mask, float("-inf")), s, generator)
        if stop is not None:
            token = token.masked_fill(done, stop)
            done |= token == stop
        out.append(token)
        if i == steps - 1 or bool(done.all()):
            break
        feed = torch.cat([token, token]) if uncond else token             # (rows,)
        next_pos = positions[:, -1:] + 1
        if use_cache:
            tokens, positions = feed[:, None], next_pos
            logits = model(tokens, positions, torch.zeros_like(tokens), cache)[-1]
        else:
            tokens, positions = torch.cat([tokens, feed[:, None]], 1), torch.cat([positions, next_pos], 1)
            doc_ids = torch.cat([doc_ids, torch.zeros_like(next_pos)], 1)
            logits = model(tokens, positions, doc_ids)[-1]
    return torch.stack(out, 1)


class Generator:
    """A model with its tokenizers: prompts in, text / code grids / pixels out."""

    def __init__(self, model: Transformer, text: AnyTextTokenizer, vocabulary: Vocabulary, visual=None,
                 image_size: int = 32, part: str = MAIN_PART):
        """`visual` decodes the vocabulary's part `part` (its only one unless it holds several visual tokenizers):
        images and videos are sampled among that part's ids."""
        self.model, self.text, self.vocabulary, self.visual = model, text, vocabulary, visual
        self.image_size, self.part = image_size, vocabulary.part(part)
        # the sequence format of images and videos
        self.encoder = DocumentEncoder(text, visual, vocabulary, image_size, 0, part=self.part)
        self.run_config, self.checkpoint = None, {}  # the training config and checkpoint record, when loaded from one
        v = model.cfg.padded_vocab_size
        ids = torch.arange(v)
        self.visual_mask = self.part.holds(ids)
        self.text_mask = (ids < vocabulary.text_size) | (ids == vocabulary.eos)

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, data: str | Path | None = None,
                        visual_tokenizer: str | Path | None = None, device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "Generator":
        """The checkpoint's model (in `dtype`) and the tokenizers of its data (vocab.json of `data` or of
        the run's first data source), the visual tokenizer (fp32) checked against the vocabulary fingerprint. In a
        vocabulary of several visual tokenizers, images are of the part that `data`'s media use."""
        model, cfg, shared = load_model(ckpt)
        data_dir, vocab = data_vocabulary(cfg, data)
        vocabulary = Vocabulary.from_dict(vocab["layout"])
        vq_dir = locate_visual_tokenizer(vocab, data_dir, vocabulary, shared, visual_tokenizer)
        gen = cls(model.to(device, dtype), load_text_tokenizer(stored_text_tokenizer(data_dir)), vocabulary,
                  load_visual_tokenizer(vq_dir).to(device), vocab.get("image_size", 32), vocab.get("visual", MAIN_PART))
        gen.run_config, gen.checkpoint = cfg, shared
        return gen

    def untrained(self) -> "Generator":
        """The same tokenizers with the run's step-0 model: its config and seed (Loom's initialisation does not
        depend on the layout), the baseline a trained checkpoint is compared with."""
        cfg = self.run_config
        model = Transformer(self.model.cfg, tensor_parallel_of(cfg), cfg.seed).eval()
        return Generator(model, self.text, self.vocabulary, self.visual, self.image_size, self.part.name)

    @property
    def default_grid(self) -> tuple[int, int]:
        side = self.image_size // self.visual.spatial
        return side, side

    def grid_template(self, frames: int, h: int, w: int, end: str) -> list[int]:
        """`frames` frames of h rows of w free slots (each row then eol, each frame then eof), then `end`."""
        return self.encoder.frame_tokens(np.full((h, w), VISUAL)) * frames + [self.vocabulary.special(end)]

    def visual_prompt(self, text: str, start: str, shape: tuple[int, ...]) -> list[int]:
        """<|bos|>, the text, then the opening of an image or video of grid `shape`."""
        prompt = self.text.encode(text) if text else []
        return [self.vocabulary.bos] + prompt + self.encoder.visual_prefix(start, shape)

    def guided_prompts(self, prompts: list[str], s: Sampling, start: str, shape: tuple[int, ...]):
        """The visual prompts of `prompts`, and those of guidance's negative prompt (None without guidance)."""
        cond = [self.visual_prompt(p, start, shape) for p in prompts]
        uncond = [self.visual_prompt(s.negative_prompt, start, shape)] * len(prompts) if s.cfg_scale != 1.0 else None
        return cond, uncond

    def _codes(self, prompts: list[str], s: Sampling, frames: int, h: int, w: int, start: str, end: str,
               shape: tuple[int, ...], use_cache: bool) -> np.ndarray:
        """Sampled code grids (n, frames, h, w)."""
        cond, uncond = self.guided_prompts(prompts, s, start, shape)
        template = self.grid_template(frames, h, w, end)
        out = sample_tokens(self.model, cond, template, self.visual_mask, s, self.vocabulary.special("<|pad|>"),
                            uncond=uncond, use_cache=use_cache).cpu()
        slots = torch.tensor(template) == VISUAL
        return (out[:, slots] - self.part.offset).view(len(prompts), frames, h, w).numpy()

    def image_codes(self, prompts: list[str], s: Sampling, grid: tuple[int, int] | None = None,
                    use_cache: bool = True) -> np.ndarray:
        """Text-to-image codes (n, h, w)."""
        h, w = grid or self.default_grid
        return self._codes(prompts, s, 1, h, w, "<|image start|>", "<|image end|>", (h, w), use_cache)[:, 0]

    def image_maps(self, prompts: list[str], s: Sampling, grid: tuple[int, int] | None = None,
                   use_cache: bool = True) -> list[list[np.ndarray]]:
        """Text-to-image maps of a next-scale model (visual_kind 'scale'), coarse to fine, per prompt: one forward
        per map (analysis/scale_sampling.py)."""
        h, w = grid or self.default_grid
        if h != w:
            raise ValueError(f"next-scale maps are square; got a {h}x{w} grid")
        cond, uncond = self.guided_prompts(prompts, s, "<|image start|>", (h, w))
        return sample_maps(self.model, self.vocabulary, self.part, cond, h, self.visual_mask, s, uncond, use_cache)

    def images(self, prompts: list[str], s: Sampling, grid: tuple[int, int] | None = None) -> list[np.ndarray]:
        """Text-to-image: (8h, 8w, 3) uint8 pixels per prompt."""
        if self.part.kind == "scale":
            return [self.visual.decode_image(maps) for maps in self.image_maps(prompts, s, grid)]
        return [self.visual.decode_image(c) for c in self.image_codes(prompts, s, grid)]

    def refuse_scale_kind(self, what: str) -> None:
        if self.part.kind == "scale":
            raise ValueError(f"{what} of a next-scale model (visual_kind 'scale') is not built yet; images are")

    def videos(self, prompts: list[str], s: Sampling, frames: int = 8,
               grid: tuple[int, int] | None = None) -> list[np.ndarray]:
        """Text-to-video: (frames, 8h, 8w, 3) uint8 per prompt; frames a multiple of the VQ's 4."""
        self.refuse_scale_kind("video generation")
        if frames % self.visual.temporal:
            raise ValueError(f"frames must be a multiple of {self.visual.temporal}, got {frames}")
        t, (h, w) = frames // self.visual.temporal, grid or self.default_grid
        codes = self._codes(prompts, s, t, h, w, "<|video start|>", "<|video end|>", (t, h, w), True)
        return [self.visual.decode_video(c) for c in codes]

    def continue_text(self, prompts: list[str], s: Sampling, use_cache: bool = True) -> list[str]:
        """Text continuation of each prompt (the prompt itself not repeated)."""
        return self._text([[self.vocabulary.bos] + self.text.encode(p) for p in prompts], s, use_cache)

    def caption(self, images: list[np.ndarray], s: Sampling, prompt: str = "") -> list[str]:
        """Image-to-text: the image's tokens (as the tokenize job writes them), then `prompt`, continued."""
        self.refuse_scale_kind("captioning")
        rows, tail = [], self.text.encode(prompt) if prompt else []
        for rgb in images:
            if rgb.shape[:2] != (self.image_size, self.image_size):
                rgb = decode_image(encode_png(rgb), self.image_size)
            codes = self.visual.encode_image(rgb)
            rows.append([self.vocabulary.bos] + self.encoder.image_tokens(codes) + tail)
        return self._text(rows, s, True)

    def _text(self, rows: list[list[int]], s: Sampling, use_cache: bool) -> list[str]:
        eos = self.vocabulary.eos
        out = sample_tokens(self.model, rows, None, self.text_mask, s, self.vocabulary.special("<|pad|>"), stop=eos,
                            use_cache=use_cache).cpu()
        texts = []
        for row in out.tolist():
            ids = row[:row.index(eos)] if eos in row else row
            texts.append(self.text.decode(ids))
        return texts


def save_video(frames: np.ndarray, path: Path, fps: int = 8) -> None:
    """(T, H, W, 3) uint8 -> .gif (Pillow) or .mp4 (PyAV), by the file's suffix."""
    if path.suffix == ".mp4":
        path.write_bytes(encode_mp4(frames, fps))
        return
    from PIL import Image

    first, *rest = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    first.save(buf, format="GIF", save_all=True, append_images=rest, duration=int(1000 / fps), loop=0)
    path.write_bytes(buf.getvalue())
