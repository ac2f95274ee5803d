"""Everything needed to continue a run, besides model and optimizer (DeepSpeed saves those)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed."""
    consumed_tokens: dict = field(default_factory=lambda: {"text": 0, "image": 0, "video": 0,
                                                           "visual_structure": 0, "total": 0})
    """Loss-bearing tokens consumed across all data-parallel ranks, per modality."""
    loader: dict | None = None
    """The loader position restored from a checkpoint (every packing stream, see data_pipeline.loader)."""
    fingerprint: str = ""
    """Vocabulary fingerprint of the data the run was trained on."""
    batches: int = 0
    """Global batches drawn from the loader: steps plus the batches skipped after loss spikes."""
    skipped_batches: list = field(default_factory=list)
    """[first, last] ranges of global batch numbers (1-based) skipped after a rollback from loss spikes."""
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss or gradient norm."""
    recent_losses: list = field(default_factory=list)
    """The last faults.spike_window losses that were not spikes (the mean spikes are measured against)."""
    spike_batches: list = field(default_factory=list)
    """Global batch numbers of the current run of loss spikes."""

    def shared(self) -> dict:
        """The part equal on every rank."""
        return {"step": self.step, "consumed_tokens": dict(self.consumed_tokens), "fingerprint": self.fingerprint,
                "batches": self.batches, "skipped_batches": [list(r) for r in self.skipped_batches],
                "skipped_steps": self.skipped_steps, "recent_losses": list(self.recent_losses),
                "spike_batches": list(self.spike_batches)}

    def per_rank(self) -> dict:
        return {"rng": rng_state()}

    @classmethod
    def restore(cls, shared: dict, per_rank: dict | None) -> "TrainState":
        """`per_rank` None: another layout resumes, whose ranks have no saved RNG streams of their own
        (nothing in training draws random numbers after initialisation: no dropout)."""
        if per_rank is not None:
            set_rng_state(per_rank["rng"])
        return cls(step=shared["step"], consumed_tokens=dict(shared["consumed_tokens"]),
                   fingerprint=shared.get("fingerprint", ""), batches=shared.get("batches", shared["step"]),
                   skipped_batches=shared.get("skipped_batches", []), skipped_steps=shared.get("skipped_steps", 0),
                   recent_losses=shared.get("recent_losses", []), spike_batches=shared.get("spike_batches", []))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
