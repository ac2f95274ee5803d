"""The whole pipeline end to end at a small size, through the `loom quickstart` command."""

import json
import math

import pytest

from conftest import run_loom


@pytest.mark.slow
def test_quickstart_end_to_end_then_skips_finished_stages(tmp_path):
    out = tmp_path / "qs"
    first = run_loom("quickstart", "--out", out, "--docs", "400", "--steps", "60", "--vq-steps", "20")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-3000:]
    result = json.loads((out / "quickstart.json").read_text())
    assert all(result["checks"].values()) and result["steps"] == 60
    for path in ("raw/world.json", "heldout/raw/world.json", "tokenizers/text_tokenizer.model",
                 "tokenizers/vq/config.json", "tokens/manifest.json", "heldout/tokens/manifest.json",
                 "train/summary.json", "train/config.yaml", "train/checkpoints/latest"):
        assert (out / path).exists(), path
    assert "quickstart: learned" in first.stdout and "tensorboard --logdir" in first.stdout
    # samples and ShapesEval of the final checkpoint, drawn by a background process during training
    shapes = json.loads((out / "train" / "shapes_eval" / "step_000060" / "shapes_eval.json").read_text())
    assert shapes["step"] == 60 and len(shapes["samples"]) == 6 * 16 and len(shapes["prompts"]) == 4
    assert result["shapes_eval"] == shapes["accuracy"] and "shapes eval at step 60" in first.stdout
    assert list((out / "train" / "tensorboard").glob("*.samples"))

    # the same checkpoint exported and drawn through transformers (Emu3Processor builds the ids training used):
    # its ShapesEval agrees with Loom's within sampling noise, 3 sigma of the difference of two means over
    # 6 x 16 prompts with p(1 - p) <= 1/4
    export = run_loom("convert", "to-hf", out / "train", tmp_path / "hf", "--format", "emu3")
    assert export.returncode == 0, export.stderr[-2000:]
    through_hf = run_loom("eval", "shapes", tmp_path / "hf", "--n", "16", "--out", tmp_path / "hf_shapes")
    assert through_hf.returncode == 0, through_hf.stderr[-2000:]
    theirs = json.loads((tmp_path / "hf_shapes" / "shapes_eval.json").read_text())["accuracy"]["overall"]
    assert abs(theirs - shapes["accuracy"]["overall"]) <= 3 * math.sqrt(2 * 0.25 / (6 * 16))

    manifest = (out / "tokens" / "manifest.json").read_bytes()
    second = run_loom("quickstart", "--out", out, "--docs", "400", "--steps", "60", "--vq-steps", "20")
    assert second.returncode == 0
    assert second.stdout.count("done already, skipped") == 7
    assert (out / "tokens" / "manifest.json").read_bytes() == manifest

    failed = run_loom("quickstart", "--out", out, "--docs", "400", "--steps", "0")  # a config error late on
    assert failed.returncode != 0 and "schedule.steps must be >= 1" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert (out / "tokens" / "manifest.json").read_bytes() == manifest  # earlier stages untouched
    assert (out / "train" / "summary.json").exists()
