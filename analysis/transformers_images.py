"""Text-to-image through transformers, from an Emu3 directory that `loom convert to-hf --format emu3` wrote.

What a user of the export does: `Emu3Processor(..., return_for_image_generation=True)` builds the prompt,
`Emu3ForConditionalGeneration.generate` samples the code grid (w codes then <|eol|> per row, then <|eof|>,
<|image end|>, forced through `prefix_allowed_tokens_fn` as transformers' Emu3 example does) with
classifier-free guidance against a negative prompt, and `decode_image_tokens` draws it. It has the
`images(prompts, sampling)` of analysis/generate.Generator, so ShapesEval scores both alike
(`loom eval shapes HF_DIR`): an export that was built with other token ids than training used scores worse.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from transformers import Emu3ForConditionalGeneration, Emu3Processor, GenerationConfig

from .generate import Sampling


def is_emu3_export(path: str | Path) -> bool:
    return (Path(path) / "processor_config.json").is_file() and (Path(path) / "config.json").is_file()


class TransformersImages:
    def __init__(self, export_dir: str | Path, device: str = "cpu"):
        self.model = Emu3ForConditionalGeneration.from_pretrained(export_dir).to(device).eval()
        self.processor = Emu3Processor.from_pretrained(export_dir)
        self.processor.tokenizer.padding_side = "left"
        self.side = int(math.isqrt(self.processor.image_processor.max_pixels))  # the training image size
        self.device = device

    def images(self, prompts: list[str], s: Sampling) -> list[np.ndarray]:
        """(side, side, 3) uint8 per prompt, sampled as `loom generate` samples (temperature, top-k/p, guidance)."""
        tok, mapping = self.processor.tokenizer, self.model.model.vocabulary_mapping
        grid = {"return_for_image_generation": True, "ratio": "1:1", "image_area": self.side * self.side}
        cond = self.processor(text=prompts, padding=True, return_tensors="pt", **grid)
        h, w = cond["image_sizes"][0]
        visual, eol = mapping.image_tokens, mapping.eol_token_id
        eof, end = tok.convert_tokens_to_ids([self.processor.eof_token, self.processor.image_end_token])
        # the grid, then <|eof|> <|image end|> <|eos|>: the three tokens decode_image_tokens drops
        steps, prompt_length = h * (w + 1) + 3, cond["input_ids"].shape[1]

        def allowed(batch_id, input_ids):  # the grid's codes; its row ends and the closing tokens are forced
            i = len(input_ids) - prompt_length
            if i < h * (w + 1):
                return [eol] if i % (w + 1) == w else visual
            return [[eof], [end], [tok.eos_token_id]][i - h * (w + 1)]

        kwargs = {}
        if s.cfg_scale != 1.0:
            negative = self.processor(text=[s.negative_prompt] * len(prompts), padding=True, return_tensors="pt",
                                      **grid)
            kwargs = {"negative_prompt_ids": negative["input_ids"].to(self.device),
                      "negative_prompt_attention_mask": negative["attention_mask"].to(self.device)}
        config = GenerationConfig(max_new_tokens=steps, do_sample=s.temperature > 0, temperature=s.temperature or None,
                                  top_k=s.top_k or None, top_p=s.top_p, guidance_scale=s.cfg_scale,
                                  pad_token_id=tok.pad_token_id, eos_token_id=None)
        torch.manual_seed(s.seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=cond["input_ids"].to(self.device),
                                      attention_mask=cond["attention_mask"].to(self.device), generation_config=config,
                                      prefix_allowed_tokens_fn=allowed, **kwargs)[:, prompt_length:]
            pixels = self.model.decode_image_tokens(image_tokens=out.cpu(), height=h, width=w)
        images = self.processor.postprocess(pixels, return_tensors="PIL.Image.Image")["pixel_values"]
        return [np.asarray(image.convert("RGB")) for image in images]
