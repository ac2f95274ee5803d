"""Every parallel layout trains the same model as one process (torchrun, gloo, 4 processes).

Same config and seed: the same initial weights and the same global batches, whatever the layout, so a
layout may differ from one process only by the order of its floating-point reductions. Each step's
loss and global grad norm must stay within FLOOR_MULTIPLE (10) x the rounding floor measured in this
session: the drift of the one-process run trained with other micro-batch sizes (tests/rounding.py).
Compiled blocks add the drift of kernel fusion, measured on one process, to their floor. bf16 layouts
are held to the floor of one-process bf16 runs, and bf16 to fp32 within bf16's unit roundoff (2^-8).
The mutation test shows that real layout bugs move the loss by BUG_SHIFT (1e-3) or more, far beyond
every fp32 tolerance here.
"""

import pytest

from conftest import REPO, run_loom
from rounding import (BUG_SHIFT, FLOOR_MULTIPLE, REFERENCE_MICRO_BATCH, Drift, assert_same_run, drift, floor_of,
                      tolerance)
from common.metrics import read_metrics

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
    # FlexAttention's block mask under TP x PP, and under SP with recomputation (its reference implementation:
    # the CPU has no flex backward, see tests/mutations/sitecustomize.py); the reference runs use the dense mask
    "tp2-pp2-zero1-flex": ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1", "model.attention=flex"],
    "tp4-sequence-parallel-flex-recompute": ["parallel.tp=4", "parallel.sequence_parallel=true",
                                             "model.attention=flex", "model.activation_checkpointing=full"],
}
LAYOUTS |= {  # context parallelism: each row split along the sequence over 2 ranks, keys and values all-gathered
    "cp2-dp2-zero2": ["parallel.cp=2", "parallel.zero_stage=2"],
    "cp2-tp2-zero1": ["parallel.cp=2", "parallel.tp=2"],
    "cp2-tp2-sequence-parallel-flex": ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                                       "model.attention=flex"],
}
FLEX_ON_CPU = {"PYTHONPATH": str(REPO / "tests" / "mutations"), "LOOM_TEST_FLEX_ON_CPU": "1"}
# Two intra-op threads make some one-process runs differ from themselves: the chameleon preset at micro-batch 4 or 8
# drifted 5e-6 to 7e-6 from step 2-5 on in one of two identical runs, and once over the floor's bug guard. With one
# thread every run repeated itself bit for bit (floor 1.9e-7).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def train(world, out, nproc, *overrides, env=None):
    if "model.attention=flex" in overrides:
        env = {**FLEX_ON_CPU, **(env or {})}
    if nproc == 1:  # one intra-op thread, as torchrun gives every process of a multi-process run (ONE_THREAD)
        env = {**ONE_THREAD, **(env or {})}
    result = run_loom("train", REPO / "configs" / "tiny.yaml", f"out_dir={out}",
                      f"data.sources.shapes.path={world / 'tokens'}", f"parallel.nproc_per_node={nproc}",
                      f"schedule.steps={STEPS}", "schedule.warmup_steps=2", "checkpoint.interval=0",
                      "data.global_batch_size=8", "data.micro_batch_size=2", "logging.interval=5", *MODEL, *overrides,
                      env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [r for r in read_metrics(out) if "loss" in r]
    assert len(records) == STEPS
    return records


def one_process(world, root, name, *overrides) -> dict:
    """A one-process run and its rounding floor: the drift of the same run with other micro-batch sizes."""
    records, floor = floor_of(lambda mb: train(world, root / f"{name}-mb{mb}", 1, *overrides,
                                               f"data.micro_batch_size={mb}"))
    return {"records": records, "dir": root / f"{name}-mb{REFERENCE_MICRO_BATCH}", "floor": floor}


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """One-process fp32 runs of each preset, with their rounding floors."""
    root = tmp_path_factory.mktemp("reference")
    return {preset: one_process(world, root, preset, f"model.preset={preset}") for preset in ("emu3", "chameleon")}


@pytest.fixture(scope="module")
def compiled_floor(world, reference, tmp_path_factory):
    """The floor of compiled blocks: the eager floor, or the drift of a compiled one-process run if larger."""
    ref = reference["emu3"]
    compiled = train(world, tmp_path_factory.mktemp("compiled") / "one", 1, "model.compile=true")
    fused = drift(compiled, ref["records"])
    print(f"compiled blocks on one process: drift {fused}")
    assert fused.loss <= tolerance(ref["floor"], ref["records"]).loss, f"compiled one process drifts: {fused}"
    return Drift(max(ref["floor"].loss, fused.loss), max(ref["floor"].grad, fused.grad))


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
def test_layout_matches_one_process_in_fp32(layout, reference, layout_run, request):
    records, _ = layout_run(layout)
    ref = reference["emu3"]
    floor = request.getfixturevalue("compiled_floor") if "model.compile=true" in LAYOUTS[layout] else ref["floor"]
    measured = assert_same_run(records, ref["records"], tolerance(floor, ref["records"]))
    print(f"{layout}: drift {measured}; floor {floor}")
    assert records[-1]["loss"]["total"] < records[0]["loss"]["total"] - 0.5  # and it learns


@pytest.mark.slow
@pytest.mark.parametrize("mutation,layout", [("missing-tp-all-reduce", "tp2-dp2-zero2"),
                                             ("wrong-tp-slice", "tp2-dp2-zero2"),
                                             ("dropped-micro-batch", "pp2-dp2-zero1")])
def test_a_layout_bug_moves_the_loss_far_beyond_the_tolerance(mutation, layout, reference, world, tmp_path):
    env = {"PYTHONPATH": str(REPO / "tests" / "mutations"), "LOOM_TEST_MUTATION": mutation}
    records = train(world, tmp_path / mutation, 4, *LAYOUTS[layout], env=env)
    ref = reference["emu3"]["records"]
    shift = max(abs(a["loss"]["total"] - b["loss"]["total"]) for a, b in zip(records, ref))
    print(f"{mutation} under {layout}: the loss moves by up to {shift:.3f}")
    assert shift >= BUG_SHIFT
    assert drift(records, ref).loss > 10 * tolerance(reference["emu3"]["floor"], ref).loss


BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bf16 keeps 8 significant bits: its loss may drift from fp32's by that, relative


def assert_close_to_fp32(records, fp32):
    for ours, ref in zip(records, fp32):
        assert abs(ours["loss"]["total"] - ref["loss"]["total"]) <= BF16_UNIT_ROUNDOFF * ref["loss"]["total"], \
            (ours["step"], ours["loss"], ref["loss"])


@pytest.fixture(scope="module")
def bf16_reference(world, tmp_path_factory):
    return one_process(world, tmp_path_factory.mktemp("bf16"), "one", "parallel.bf16=true")


@pytest.mark.slow
def test_one_process_in_bf16_stays_close_to_fp32(bf16_reference, reference):
    assert_close_to_fp32(bf16_reference["records"], reference["emu3"]["records"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2-pp2-zero1", "tp2-dp2-zero3"])
def test_layout_in_bf16_matches_one_process_in_bf16(layout, bf16_reference, reference, world, tmp_path):
    records = train(world, tmp_path / layout, 4, *LAYOUTS[layout], "parallel.bf16=true")
    floor = bf16_reference["floor"]  # bf16's floor is ~1e-3 of fp32's: a bug would show in the fp32 tests above
    allowed = floor.scaled(FLOOR_MULTIPLE)
    print(f"{layout} bf16: drift {assert_same_run(records, bf16_reference['records'], allowed)}; floor {floor}")
    assert_close_to_fp32(records, reference["emu3"]["records"])


@pytest.mark.slow
def test_chameleon_preset_under_tp_and_pp(reference, world, tmp_path):
    records = train(world, tmp_path / "cham", 4, "model.preset=chameleon", *LAYOUTS["tp2-pp2-zero1"])
    ref = reference["chameleon"]
    assert_same_run(records, ref["records"], tolerance(ref["floor"], ref["records"]))


# Options off by default: text-to-image training (caption dropout, loss weights) and what imported models bring
# (Qwen2's q/k/v biases, Llama 3's RoPE scaling)
OPTIONS = ["data.caption_dropout=0.5", "loss.weights.text=0.25", "model.qkv_bias=true",
           "model.rope_scaling={factor: 8, low_freq_factor: 1, high_freq_factor: 4, "
           "original_max_position_embeddings: 64}"]


@pytest.fixture(scope="module")
def options_reference(world, tmp_path_factory):
    return one_process(world, tmp_path_factory.mktemp("options"), "one", *OPTIONS)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2-pp2-zero1", "pp2-dp2-zero1"])
def test_optional_features_match_one_process(layout, options_reference, reference, world, tmp_path):
    """The same documents lose their captions and the same weighted loss, biases and scaled RoPE are trained under
    TP2xPP2 (the pipeline's loss function, the biases split by TP) and PP2xDP2 (the weighted token count over
    data-parallel ranks) as on one process; and the options matter: the run without them differs far beyond the
    tolerance."""
    ref = options_reference
    records = train(world, tmp_path / layout, 4, *LAYOUTS[layout], *OPTIONS)
    allowed = tolerance(ref["floor"], ref["records"])
    print(f"{layout} with {OPTIONS}: drift {assert_same_run(records, ref['records'], allowed)}")
    dropped = [r["captions_dropped"] for r in records if "captions_dropped" in r]
    assert dropped == [r["captions_dropped"] for r in ref["records"] if "captions_dropped" in r] and dropped[-1] > 0
    assert drift(ref["records"], reference["emu3"]["records"]).loss > 100 * allowed.loss


@pytest.mark.slow
def test_loss_curves_in_tensorboard_agree_between_one_process_and_tp2_pp2(reference, layout_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref, curves = reference["emu3"], {}
    for name, run in (("single", ref["dir"]), ("tp2pp2", layout_run("tp2-pp2-zero1")[1])):
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        curves[name] = [e.value for e in events.Scalars("loss/total")]
        assert "mfu" in events.Tags()["scalars"] and "tflops_per_device" in events.Tags()["scalars"]
    assert len(curves["single"]) == STEPS
    allowed = tolerance(ref["floor"], ref["records"]).loss
    assert all(abs(a - b) <= allowed * a for a, b in zip(curves["single"], curves["tp2pp2"]))


def test_batches_pack_several_documents_per_row(world):
    from data_pipeline.loader import Source, TokenLoader, read_manifest_fingerprints

    src = Source.open("shapes", world / "tokens", 1.0)
    loader = TokenLoader([src], read_manifest_fingerprints([src])[1], seq_len=128, global_batch_size=8,
                         micro_batch_size=2)
    docs_per_row = [int(mb["doc_ids"][i].max()) + 1 for mb in loader.next_step() for i in range(2)]
    assert sum(n >= 2 for n in docs_per_row) >= 6 and max(docs_per_row) >= 3  # masks are exercised above
