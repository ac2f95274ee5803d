"""Every parallel layout trains the same model as one process (torchrun, gloo, 4 processes).

Same config and seed: the same initial weights and the same global batches, whatever the layout.
fp32: the loss of each of 10 steps within 1e-6 relative of one process and the global grad norm
within 1e-4 relative (compiled blocks: 5e-6 and 3e-4). Layouts sum in other orders (vocab-parallel
cross-entropy, gradient all-reduces; inductor fuses the blocks' ops), and Adam turns those rounding
differences in near-zero gradients into full-size updates, so they grow over the steps. Measured in
CI on the test world, max over the steps: TP layouts 1.5-3.8e-7 (loss) and 1.6-2.8e-5 (grad norm),
PP2 x DP2 6e-8 and 3e-7, compiled blocks 1.2e-6 and 6.8e-5. A layout bug shows up at 1e-3 or more.
bf16: within 1e-2 of the one-process fp32 loss.
"""

import pytest

from conftest import REPO, run_loom
from pretrain.metrics import read_metrics

STEPS = 10
MODEL = ["model.dim=64", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=176"]
LAYOUTS = {
    "tp2-pp2-zero1": ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"],
    "tp2-dp2-zero2": ["parallel.tp=2", "parallel.zero_stage=2"],
    "tp2-dp2-zero3": ["parallel.tp=2", "parallel.zero_stage=3"],
    "pp2-dp2-zero1": ["parallel.pp=2", "parallel.zero_stage=1"],
    "tp4-sequence-parallel": ["parallel.tp=4", "parallel.sequence_parallel=true"],
    "tp2-dp2-full-recompute": ["parallel.tp=2", "model.activation_checkpointing=full"],
    "tp2-dp2-attention-recompute": ["parallel.tp=2", "model.activation_checkpointing=attention"],
    "tp2-dp2-compiled-blocks": ["parallel.tp=2", "model.compile=true"],
}


def train(world, out, nproc, *overrides):
    result = run_loom("train", REPO / "configs" / "tiny.yaml", f"out_dir={out}",
                      f"data.sources.shapes.path={world / 'tokens'}", f"parallel.nproc_per_node={nproc}",
                      f"schedule.steps={STEPS}", "schedule.warmup_steps=2", "checkpoint.interval=0",
                      "data.global_batch_size=8", "data.micro_batch_size=2", "logging.interval=5", *MODEL, *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [r for r in read_metrics(out) if "loss" in r]
    assert len(records) == STEPS
    return records


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """One-process runs of each preset: their per-step records (and run directories, under "<preset>_dir")."""
    root = tmp_path_factory.mktemp("reference")
    runs = {preset: train(world, root / preset, 1, f"model.preset={preset}") for preset in ("emu3", "chameleon")}
    return {**runs, **{f"{preset}_dir": root / preset for preset in runs}}


LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-4
COMPILED_LOSS_RTOL, COMPILED_GRAD_RTOL = 5e-6, 3e-4


def assert_same_run(records, reference, loss_rtol, grad_tol):
    for ours, ref in zip(records, reference):
        assert abs(ours["loss"]["total"] - ref["loss"]["total"]) <= loss_rtol * ref["loss"]["total"], \
            (ours["step"], ours["loss"], ref["loss"])
        assert abs(ours["grad_norm"] - ref["grad_norm"]) <= grad_tol * ref["grad_norm"], ours["step"]
        assert ours["consumed_tokens"] == ref["consumed_tokens"]  # the same data


@pytest.fixture(scope="module")
def layout_run(world, tmp_path_factory):
    """The fp32 4-process run of a layout, trained once per module: (records, run directory)."""
    root, runs = tmp_path_factory.mktemp("layouts"), {}

    def run(layout):
        if layout not in runs:
            runs[layout] = train(world, root / layout, 4, *LAYOUTS[layout]), root / layout
        return runs[layout]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_layout_matches_one_process_in_fp32(layout, reference, layout_run):
    records, _ = layout_run(layout)
    compiled = "model.compile=true" in LAYOUTS[layout]
    assert_same_run(records, reference["emu3"], COMPILED_LOSS_RTOL if compiled else LOSS_RTOL,
                    COMPILED_GRAD_RTOL if compiled else GRAD_RTOL)
    assert records[-1]["loss"]["total"] < records[0]["loss"]["total"] - 0.5  # and it learns


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2-pp2-zero1", "tp2-dp2-zero3"])
def test_layout_in_bf16_stays_close_to_fp32(layout, reference, world, tmp_path):
    records = train(world, tmp_path / layout, 4, *LAYOUTS[layout], "parallel.bf16=true")
    for ours, ref in zip(records, reference["emu3"]):
        assert abs(ours["loss"]["total"] - ref["loss"]["total"]) <= 1e-2, (ours["step"], ours["loss"], ref["loss"])


@pytest.mark.slow
def test_chameleon_preset_under_tp_and_pp(reference, world, tmp_path):
    records = train(world, tmp_path / "cham", 4, "model.preset=chameleon", *LAYOUTS["tp2-pp2-zero1"])
    assert_same_run(records, reference["chameleon"], LOSS_RTOL, GRAD_RTOL)


@pytest.mark.slow
def test_loss_curves_in_tensorboard_agree_between_one_process_and_tp2_pp2(reference, layout_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for name, run in (("single", reference["emu3_dir"]), ("tp2pp2", layout_run("tp2-pp2-zero1")[1])):
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        curves[name] = [e.value for e in events.Scalars("loss/total")]
        assert "mfu" in events.Tags()["scalars"] and "tflops_per_device" in events.Tags()["scalars"]
    assert len(curves["single"]) == STEPS
    assert all(abs(a - b) <= LOSS_RTOL * a for a, b in zip(curves["single"], curves["tp2pp2"]))


def test_batches_pack_several_documents_per_row(world):
    from data_pipeline.loader import Source, TokenLoader, read_manifest_fingerprints

    src = Source.open("shapes", world / "tokens", 1.0)
    loader = TokenLoader([src], read_manifest_fingerprints([src])[1], 128, 8, 2)
    docs_per_row = [int(mb["doc_ids"][i].max()) + 1 for mb in loader.next_step() for i in range(2)]
    assert sum(n >= 2 for n in docs_per_row) >= 6 and max(docs_per_row) >= 3  # masks are exercised above
