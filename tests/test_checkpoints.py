"""Checkpoints users can trust: killed saves, corrupted files, exact resume, resharding across layouts.

Source runs train 6 steps with checkpoints at steps 3 and 6. Resuming from step 3 must give the
source run's steps 4-6: bit for bit in the same layout; under another layout, where the only difference
is the order of floating-point reductions, within twice the layout tolerance of tests/rounding.py
(source and target may each drift from one process by that much), from a rounding floor measured on
one process in this configuration (bf16 runs: the floor of one-process bf16 runs). What a resharding load
puts into each rank's partitions is checked without any tolerance: saved by DeepSpeed right after the load
(tests/mutations/sitecustomize.py) and merged, it equals the checkpoint read, bit for bit. The matrix: from
TP2xPP2 ZeRO-1 bf16 and from TP2xDP2 ZeRO-3 into TP2xDP2 ZeRO-2 and ZeRO-3, TP4, PP2xDP2 and one process.
"""

import json
import shutil

import pytest

from common.checkpoint_folders import latest_tag
from common.checkpoint_folders import COMPLETE
from common.manifest import MANIFEST
from conftest import REPO, SOURCE_LAYOUTS, run_loom, train_tiny
from rounding import FLOOR_MULTIPLE, assert_same_run, floor_of, tolerance
from common.metrics import read_metrics

SOURCES = {name: (4, layout) for name, layout in SOURCE_LAYOUTS.items()}
TARGETS = {"tp1-dp2-zero1": (2, ["parallel.tp=1", "parallel.pp=1", "parallel.zero_stage=1"]),
           "tp1-pp2-zero1": (2, ["parallel.tp=1", "parallel.pp=2", "parallel.zero_stage=1"]),
           "cp2-zero1": (2, ["parallel.tp=1", "parallel.pp=1", "parallel.cp=2", "parallel.zero_stage=1"])}
MATRIX_TARGETS = {"tp2-dp2-zero2": (4, ["parallel.tp=2", "parallel.zero_stage=2"]),  # every source into each of these
                  "tp2-dp2-zero3": (4, ["parallel.tp=2", "parallel.zero_stage=3"]),
                  "tp4": (4, ["parallel.tp=4", "parallel.zero_stage=1"]),
                  "pp2-dp2-zero1": (4, ["parallel.pp=2", "parallel.zero_stage=1"]),
                  "one-process": (1, ["parallel.zero_stage=1"])}
TARGETS |= MATRIX_TARGETS
train = train_tiny


def steps(out) -> dict:
    return {r["step"]: r for r in read_metrics(out) if "loss" in r}


def from_step_3(src, dst):
    """A copy of run `src` as if it had been stopped after the checkpoint of step 3."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_000006")
    (dst / "checkpoints" / "latest").write_text("step_000003\n")
    return dst


@pytest.mark.slow
def test_resume_in_the_same_layout_is_bitwise(sources, world, tmp_path):
    """TP2xPP2 here; 2-process ZeRO-1 in test_train.py."""
    source = "tp2-pp2-zero1"
    resumed = from_step_3(sources / source, tmp_path / "resumed")
    nproc, layout = SOURCES[source]
    result = train(world, resumed, nproc, *layout)
    assert "resharding" not in result.stdout
    ours, ref = steps(resumed), steps(sources / source)
    for step in (4, 5, 6):
        assert (ours[step]["loss"], ours[step]["grad_norm"]) == (ref[step]["loss"], ref[step]["grad_norm"])


@pytest.fixture(scope="module")
def reshard_tolerance(world, tmp_path_factory):
    """Twice the layout tolerance of `train_tiny` runs (source and target layout each drift from one process),
    for "fp32" and "bf16" runs, measured when first asked for."""
    root, measured = tmp_path_factory.mktemp("floor"), {}

    def of(precision: str):
        if precision not in measured:
            bf16 = [f"parallel.bf16={str(precision == 'bf16').lower()}"]

            def run(micro_batch):  # the source runs' micro-batch is the reference's (2)
                train(world, root / f"{precision}-mb{micro_batch}", 1, f"data.micro_batch_size={micro_batch}", *bf16)
                return list(steps(root / f"{precision}-mb{micro_batch}").values())
            reference, floor = floor_of(run)
            # bf16's floor is ~1e3 x fp32's: the bug guard of tolerance() holds for fp32 only; what a resharding
            # load puts into the partitions is compared bit for bit in any precision (test_reshard_...)
            measured[precision] = (tolerance(floor, reference) if precision == "fp32"
                                   else floor.scaled(FLOOR_MULTIPLE)).scaled(2)
        return measured[precision]
    return of


RESHARDS = [("tp2-pp2-zero1", "tp1-dp2-zero1"), ("tp2-dp2-zero3", "tp1-pp2-zero1"), ("cp2-tp2-zero2", "tp1-dp2-zero1"),
            ("tp2-pp2-zero1", "cp2-zero1")]
RESHARDS += [(source, target) for source in ("tp2-pp2-zero1-bf16", "tp2-dp2-zero3") for target in MATRIX_TARGETS
             if target != source]


@pytest.mark.slow
@pytest.mark.parametrize("source,target", RESHARDS)
def test_reshard_continues_the_source_run(source, target, sources, reshard_tolerance, world, tmp_path):
    """Resumed from step 3 under another layout: every rank's partitions hold exactly the checkpoint's weights and
    Adam moments (its tensor-parallel slice, its ZeRO shard), and the continued steps follow the source run."""
    resumed = from_step_3(sources / source, tmp_path / "resharded")
    nproc, layout = TARGETS[target]
    bf16 = "parallel.bf16=true" in SOURCE_LAYOUTS[source]
    loaded = tmp_path / "as_loaded"
    result = train(world, resumed, nproc, *layout, *(["parallel.bf16=true"] if bf16 else []),
                   env={"PYTHONPATH": str(REPO / "tests" / "mutations"), "LOOM_TEST_SAVE_AFTER_LOAD": str(loaded)})
    assert "resharding to" in result.stdout and "at step 3" in result.stdout
    assert_holds_the_checkpoint(loaded / "loaded", layout_of(resumed), resumed / "checkpoints" / "step_000003")
    ours, ref = steps(resumed), steps(sources / source)
    continued = [ours[step] for step in (4, 5, 6)]
    allowed = reshard_tolerance("bf16" if bf16 else "fp32")
    print(f"{source} -> {target}: drift {assert_same_run(continued, list(ref.values()), allowed)}")
    for step in (4, 5, 6):  # assert_same_run checked the consumed tokens too: the same data, no repeats
        assert ours[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-12)


def layout_of(run) -> dict:
    """The layout the resumed run saved its own checkpoints with (step 6)."""
    return json.loads((run / "checkpoints" / "step_000006" / "loom_state.json").read_text())["layout"]


def assert_holds_the_checkpoint(saved, layout: dict, checkpoint):
    """DeepSpeed's save of the engine right after the load, merged from all ranks, equals the consolidated
    checkpoint it loaded: weights (fp32 masters), both Adam moments and the optimizer step, bit for bit."""
    import torch

    from pretrain.consolidate import MOMENTS, read_deepspeed
    from pretrain.portable import MODEL_FILE, OPTIMIZER_FILE
    from safetensors.torch import load_file

    engine = read_deepspeed(saved, layout["tp"], layout["pp"], layout["dp"], layout["zero_stage"], 4)
    portable = checkpoint / "portable"
    expected = {"params": load_file(portable / MODEL_FILE)}
    moments = load_file(portable / OPTIMIZER_FILE)
    expected |= {k: {n.split("/", 1)[1]: t for n, t in moments.items() if n.startswith(k + "/")} for k in MOMENTS}
    for key, tensors in expected.items():
        assert sorted(engine[key]) == sorted(tensors), key
        unequal = [n for n, t in tensors.items() if not torch.equal(engine[key][n], t)]
        assert not unequal, f"{key} differs from {checkpoint} after the load: {unequal}"
    assert engine["optimizer_step"] == json.loads((checkpoint / "loom_state.json").read_text())["step"]


@pytest.mark.slow
@pytest.mark.parametrize("source", list(SOURCES))
def test_streaming_consolidation_writes_what_safetensors_writes(source, sources, tmp_path):
    """Two processes (threads here) each merging and writing half of the parameters, one at a time, at offsets
    computed from the shapes alone: byte for byte the files safetensors' own writer makes from all tensors
    in memory, for ZeRO-1 with a pipeline, ZeRO-3 and context parallelism."""
    import filecmp
    import threading

    from pretrain.consolidate import MOMENTS, read_deepspeed
    from pretrain.portable import ENGINE_FILE, MODEL_FILE, OPTIMIZER_FILE, portable_from_deepspeed, write_portable

    folder = sources / source / "checkpoints" / "step_000006"
    saved = json.loads((folder / "loom_state.json").read_text())["layout"]
    together = threading.Barrier(2)
    workers = [threading.Thread(target=portable_from_deepspeed,
                                args=(folder, saved, 4, tmp_path / "streamed", rank, 2, together.wait))
               for rank in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    everything = read_deepspeed(folder, saved["tp"], saved["pp"], saved["dp"], saved["zero_stage"], 4)
    write_portable(tmp_path / "in_memory", everything["params"], {k: everything[k] for k in MOMENTS},
                   {**everything["engine"], "optimizer_step": everything["optimizer_step"]})
    for file in (MODEL_FILE, OPTIMIZER_FILE, ENGINE_FILE):
        assert filecmp.cmp(tmp_path / "streamed" / file, tmp_path / "in_memory" / file, shallow=False), file


@pytest.mark.slow
def test_loom_ckpt_consolidate_prepares_a_resume_under_another_layout(sources, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sources / "tp2-dp2-zero3", run)
    result = run_loom("ckpt", "consolidate", run)
    assert result.returncode == 0, result.stderr
    assert "consolidated" in result.stdout and (run / "checkpoints" / "step_000006" / "portable" /
                                                "model.safetensors").exists()
    assert "exists" in run_loom("ckpt", "consolidate", run).stdout  # once


@pytest.mark.slow
def test_a_rank_killed_while_saving_leaves_the_previous_checkpoint(world, tmp_path):
    out = tmp_path / "run"
    crashed = train(world, out, 2, "schedule.steps=4", "checkpoint.interval=2", env={"LOOM_FAULT": "save:4:1"},
                    ok=False)
    assert crashed.returncode != 0 and "LOOM_FAULT: rank 1 dies at save, step 4" in crashed.stdout
    assert latest_tag(out) == "step_000002"
    assert not (out / "checkpoints" / "step_000004" / COMPLETE).exists()
    logged = steps(out)
    resumed = train(world, out, 2, "schedule.steps=4", "checkpoint.interval=2")  # no manual cleanup
    assert "resumed from" in resumed.stdout and "step_000002 at step 2" in resumed.stdout
    assert latest_tag(out) == "step_000004"
    again = steps(out)
    for step in (3, 4):  # the crashed run trained steps 3 and 4 before dying in the save
        assert again[step]["loss"] == logged[step]["loss"]

    report = run_loom("ckpt", "inspect", out)
    assert report.returncode == 0, report.stderr[-2000:]
    info = json.loads(report.stdout)
    assert info["step"] == 4 and info["complete"] and info["manifest"].startswith("ok")
    assert info["layout"]["dp"] == 2 and info["consumed_tokens"] == again[4]["consumed_tokens"]

    # a flipped byte in a complete checkpoint is refused, naming the file
    ckpt = out / "checkpoints" / "step_000004"
    victim = sorted(ckpt.glob("*optim_states.pt"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    refused = train(world, out, 2, "schedule.steps=6", ok=False)
    assert refused.returncode != 0
    assert f"{victim} does not match its sha256 in {MANIFEST}" in refused.stderr
    report = run_loom("ckpt", "inspect", ckpt)
    assert report.returncode == 1 and "does not match its sha256" in json.loads(report.stdout)["manifest"]
    manifest = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert victim.name in manifest and "loom_state.json" in manifest and "config.yaml" in manifest


def test_shards_of_another_deepspeed_layout_are_refused_with_its_version(tmp_path):
    """Loom reads DeepSpeed's own checkpoint layout; files of another layout name the version that wrote them."""
    import torch

    from common.checkpoint_folders import CheckpointError
    from pretrain.consolidate import DeepSpeedCheckpoint

    torch.save({"param_shapes": [{"w": (2, 2)}], "ds_version": "0.99.0"}, tmp_path / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"renamed_partitions": []}},
               tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="written by DeepSpeed 0.99.0, and Loom reads the layout of "
                                              "DeepSpeed 0.19"):
        DeepSpeedCheckpoint(tmp_path, 1, 1, 1, 1, 2)
