"""What training does about the faults of clusters: preemption, non-finite steps, loss spikes, hung collectives.

- Preemption: SIGTERM (what SLURM sends before preempting or at the time limit) sets a flag; at the next step
  boundary the ranks agree on it (one all-reduce), save a checkpoint at that step and exit 0.
- Non-finite steps: DeepSpeed already discards an update whose global gradient norm is NaN/Inf (the norm is
  all-reduced, so every rank discards it). Loom checks that it did, names the ranks whose loss was not finite,
  counts skipped steps and stops past `faults.max_skipped_steps`.
- Loss spikes: a loss over `spike_factor` x the recent mean is logged; after `spike_rollback_after` in a row,
  training rolls back to the newest checkpoint before them and skips their global batches (PaLM's remedy).
  Every decision uses the all-reduced loss, so all ranks decide alike without communicating.
- Hung collectives: a watchdog thread; code that runs collectives does so inside `phase(name)`; a rank
  with no phase change for `step_timeout_s` prints the phase and step and exits with EXIT_HUNG. A collective
  that fails instead (its peer died) raises PhaseError, naming the phase and step too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from .config import FaultsConfig
from .train_state import TrainState

EXIT_HUNG = 3
MIN_SPIKE_HISTORY = 3


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite steps, nothing to roll back to), said for the user."""


class PhaseError(RuntimeError):
    """An error inside a phase of collectives (a peer died, a backend timeout, an out-of-memory): the rank, the
    phase and the step, then the original words."""


class Watchdog:
    """Exits the process when it stays in one collective phase longer than the timeout."""

    def __init__(self):
        self.phases: list[str] = []
        self.changed = time.monotonic()
        self.step = 0
        self.timeout, self.rank, self.thread = 0.0, 0, None

    def start(self, timeout: float, rank: int) -> None:
        self.timeout, self.rank = timeout, rank
        if self.thread is None:
            self.thread = threading.Thread(target=self._watch, name="loom-watchdog", daemon=True)
            self.thread.start()

    @contextlib.contextmanager
    def phase(self, name: str):
        self.phases.append(name)
        self.changed = time.monotonic()
        try:
            yield
        except (PhaseError, TrainingError):
            raise
        except RuntimeError as e:  # what torch.distributed backends raise, e.g. gloo's "Connection closed by peer"
            raise PhaseError(f"rank {self.rank}: {name} at step {self.step} failed: {e}") from e
        finally:
            self.phases.pop()
            self.changed = time.monotonic()

    def _watch(self) -> None:
        while True:
            time.sleep(max(0.2, min(5.0, self.timeout / 20)))
            phases = list(self.phases)
            stuck = time.monotonic() - self.changed
            if phases and stuck > self.timeout:
                message = (f"loom: error: rank {self.rank}: no progress for {stuck:.0f} s in {phases[-1]} at step "
                           f"{self.step} (faults.step_timeout_s={self.timeout:g}): a collective is hung, or a rank "
                           f"died or is stuck before it; exiting")
                print(message, flush=True)
                print(message, file=sys.stderr, flush=True)
                os._exit(EXIT_HUNG)


WATCHDOG = Watchdog()
phase = WATCHDOG.phase


class Preemption:
    """SIGTERM -> checkpoint at the current step, exit 0. Install in the main thread."""

    def __init__(self):
        self.signal_name = None
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self, device: torch.device) -> bool:
        """Collective: True on every rank when any rank received the signal."""
        flag = torch.tensor(float(self.signal_name is not None), device=device)
        with phase("the all-reduce of the preemption flag"):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


def check_step(engine, sums: torch.Tensor, local_bad: bool, state: TrainState, faults: FaultsConfig,
               device: torch.device, log) -> bool:
    """After a step: False when it was skipped for a non-finite loss or gradient norm (the same on every rank,
    since `sums` and the step's fate are); raises TrainingError past the limit. Collective only when skipped."""
    finite = bool(torch.isfinite(sums).all())
    applied = engine.was_step_applied()
    if finite and applied:
        return True
    if applied:
        raise TrainingError(f"step {state.step}: the loss is not finite but DeepSpeed applied the update "
                            f"(is optimizer.grad_clip 0?); the weights are damaged: resume from the last checkpoint")
    ranks = torch.zeros(dist.get_world_size(), device=device)
    ranks[dist.get_rank()] = float(local_bad)
    with phase("the all-reduce naming the ranks with a non-finite loss"):
        dist.all_reduce(ranks)
    named = [int(r) for r in torch.nonzero(ranks).flatten()]
    where = (f"non-finite loss on rank{'s' if len(named) > 1 else ''} {', '.join(map(str, named))}" if named
             else "non-finite gradient norm (the loss was finite on every rank)")
    state.skipped_steps += 1
    if state.skipped_steps > faults.max_skipped_steps:
        raise TrainingError(f"step {state.step}: {where}; {state.skipped_steps} steps skipped in this run, more than "
                            f"faults.max_skipped_steps={faults.max_skipped_steps}: stopping. Lower optimizer.lr, raise "
                            f"the limit, or resume from a checkpoint before the trouble")
    log(f"step {state.step}: {where}: the update was skipped on every rank "
        f"({state.skipped_steps}/{faults.max_skipped_steps} skipped steps allowed)")
    return False


def observe_loss(loss: float, state: TrainState, faults: FaultsConfig, log) -> bool:
    """Track the recent losses; True when a rollback is due (spike_rollback_after spikes in a row)."""
    recent = state.recent_losses
    if faults.spike_factor and len(recent) >= MIN_SPIKE_HISTORY:
        mean = sum(recent) / len(recent)
        if loss > faults.spike_factor * mean:
            state.spike_batches.append(state.batches)
            log(f"step {state.step}: loss spike: {loss:.3f} > {faults.spike_factor:g} x the mean {mean:.3f} of the "
                f"last {len(recent)} steps (global batch {state.batches}; {len(state.spike_batches)} in a row)")
            return bool(faults.spike_rollback_after) and len(state.spike_batches) >= faults.spike_rollback_after
    state.spike_batches = []
    recent.append(loss)
    del recent[:-faults.spike_window]
    return False


def draw_batch(loader, state: TrainState) -> list[dict]:
    """The next global batch, passing over the batches that a rollback marked as skipped."""
    while True:
        micro = loader.next_step()
        state.batches += 1
        if not any(first <= state.batches <= last for first, last in state.skipped_batches):
            return micro
