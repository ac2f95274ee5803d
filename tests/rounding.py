"""How far two runs that differ only in the order of floating-point reductions may drift apart.

A parallel layout computes the same sums as one process in another order (split GEMMs, vocab-parallel
cross-entropy, gradient all-reduces, fused kernels). That moves the loss by an ulp at first, and Adam
then turns the rounding noise of near-zero gradients into full-size updates, so the drift grows over
the steps by an amount that depends on the CPU's GEMM kernels (AVX-512 vs AMX, blocking). No fixed
tolerance follows from the arithmetic; what does is a comparison with the same effect in a run that is
known to be right: the one-process reference trained again with micro-batches of 1, 4 and 8 instead of
2 (the same global batch and data; only the accumulation order differs). The largest deviation of
those, step by step over the whole run, is the *rounding floor* of this machine and this
configuration, measured in the same session as the runs it judges.

A layout must stay within FLOOR_MULTIPLE x the floor. Measured on an AMD EPYC (AVX-512, no AMX), fp32,
10 steps of the test model, two intra-op threads: floor 4.5e-7 (loss, relative) and 2.0e-5 (grad norm; one
thread, as the tests now run it: 1.2e-7 and 1.8e-5); TP layouts drift
1.0e-6 and 5.7e-5 (2.3x and 2.8x the floor), PP2xDP2 0.1x, compiled blocks see test_layouts.
FLOOR_MULTIPLE = 10 leaves 3.5x room above the worst layout while the allowed loss drift stays more than
10x below BUG_SHIFT, the smallest loss shift of the real bugs that test_layouts injects (a dropped
micro-batch, a wrong TP slice, a missing TP all-reduce: 1e-3 and more, from the first steps on).
"""

from __future__ import annotations

from dataclasses import dataclass

FP32_EPS = 2.0 ** -23          # one ulp of a float32 relative to its value: the floor is never below it
FLOOR_MULTIPLE = 10.0
REFERENCE_MICRO_BATCH, EQUIVALENT_MICRO_BATCHES = 2, (1, 4, 8)  # the same global batch, summed in other orders
BUG_SHIFT = 1e-3               # absolute loss shift of the smallest layout bug test_layouts injects


@dataclass(frozen=True)
class Drift:
    """The largest relative deviation over the compared steps: of the total loss and of the global grad norm."""

    loss: float
    grad: float

    def __str__(self) -> str:
        return f"loss {self.loss:.2e}, grad norm {self.grad:.2e} (relative, max over steps)"

    def scaled(self, factor: float) -> "Drift":
        return Drift(factor * self.loss, factor * self.grad)


def drift(records: list[dict], reference: list[dict], steps: set[int] | None = None) -> Drift:
    """Drift of a run's metrics records from a reference's, over `steps` (default: all logged steps of both)."""
    ref = {r["step"]: r for r in reference}
    pairs = [(r, ref[r["step"]]) for r in records if r["step"] in ref and (steps is None or r["step"] in steps)]
    assert pairs, "no common steps to compare"
    return Drift(max(abs(a["loss"]["total"] - b["loss"]["total"]) / b["loss"]["total"] for a, b in pairs),
                 max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in pairs))


def rounding_floor(reference: list[dict], equivalents: list[list[dict]], steps: set[int] | None = None) -> Drift:
    """The largest drift from `reference` of runs that differ from it only in reduction order (at least an ulp)."""
    drifts = [drift(run, reference, steps) for run in equivalents]
    return Drift(max(FP32_EPS, *(d.loss for d in drifts)), max(FP32_EPS, *(d.grad for d in drifts)))


def floor_of(run) -> tuple[list[dict], Drift]:
    """The one-process reference and its rounding floor; `run(micro_batch)` trains one process and returns its
    metrics records."""
    reference = run(REFERENCE_MICRO_BATCH)
    return reference, rounding_floor(reference, [run(mb) for mb in EQUIVALENT_MICRO_BATCHES])


def tolerance(floor: Drift, reference: list[dict]) -> Drift:
    """FLOOR_MULTIPLE x the floor, refused when it would let a real bug through (the floor itself is broken)."""
    allowed = floor.scaled(FLOOR_MULTIPLE)
    largest_loss = max(r["loss"]["total"] for r in reference)
    assert allowed.loss * largest_loss <= BUG_SHIFT / 10, \
        f"rounding floor {floor} too high: a tolerance of {FLOOR_MULTIPLE:g}x it would hide a layout bug"
    return allowed


def assert_same_run(records: list[dict], reference: list[dict], allowed: Drift, steps: set[int] | None = None):
    """The run drifts from the reference by no more than `allowed`, and read exactly the same data."""
    ref = {r["step"]: r for r in reference}
    assert all(r["consumed_tokens"] == ref[r["step"]]["consumed_tokens"] for r in records if r["step"] in ref)
    measured = drift(records, reference, steps)
    assert measured.loss <= allowed.loss and measured.grad <= allowed.grad, f"drift {measured}; allowed {allowed}"
    return measured
