"""optimizer.freeze_steps: an imported LLM with a grown vocabulary first trains only its new rows and its norms.

The new rows (ids from model.new_rows_from on, see checkpoints_utils.hf.grow_vocab) start untrained while every
other weight is trained; letting the whole model follow their first, large gradients would damage what it knows.
So for the first freeze_steps steps every other gradient is zeroed by a tensor hook as backward produces it
(before DeepSpeed reduces, clips or partitions it), and weight decay is off: AdamW then moves an entry whose
gradient has always been zero by exactly 0, and the imported weights stay bit for bit. From the step after, all
weights train; their Adam moments start at zero, as the new rows' did at step 1.
"""

from __future__ import annotations

import torch

from .model import Embedding, Head, is_norm


class FreezeImported:
    """The hooks and the weight-decay switch of optimizer.freeze_steps; `at(step)` before each step."""

    def __init__(self, model: torch.nn.Module, new_rows_from: int, steps: int, param_groups: list[dict]):
        self.steps, self.active, self.param_groups = steps, False, param_groups
        self.weight_decay = [g["weight_decay"] for g in param_groups]
        if not steps:
            return
        trainable = {}  # parameter -> rows it trains (a 0/1 column), by this rank's part of the vocabulary
        for module in model.modules():
            if isinstance(module, Embedding):
                first, p = module.embed.vocab_start_index, module.embed.weight
            elif isinstance(module, Head):
                first, p = module.first_row, module.output.weight
            else:
                continue
            # under ZeRO-3 p holds an empty partition; its gradient still arrives whole, in ds_shape
            rows = torch.arange(first, first + getattr(p, "ds_shape", p.shape)[0], device=p.device)
            trainable[p] = (rows >= new_rows_from).to(p.dtype)[:, None]
        for name, p in model.named_parameters():
            if is_norm(name):  # the norms train throughout
                continue
            mask = trainable.get(p, torch.zeros((), dtype=p.dtype, device=p.device))
            p.register_hook(lambda grad, mask=mask: grad * mask if self.active else grad)

    def at(self, step: int) -> None:
        """Freeze for step `step` (1-based) when it is one of the first `steps`, else train everything."""
        self.active = step <= self.steps
        for group, decay in zip(self.param_groups, self.weight_decay):
            group["weight_decay"] = 0.0 if self.active else decay
