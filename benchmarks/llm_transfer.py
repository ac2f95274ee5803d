"""Start from a pretrained LLM, as a user does, against training from scratch, at equal steps (issue 21's figures).

    python benchmarks/llm_transfer.py [--quickstart runs/quickstart] [--out runs/transfer] [--steps 300]

On the quickstart's world (`loom quickstart` first), through the CLI only:
1. a text-only model: the world's text (every document's text segments, images left out) tokenized with the
   quickstart's tokenizers, trained with the quickstart recipe;
2. exported as a Llama directory (`loom convert to-hf --format llama`), imported with a vocabulary grown to the
   quickstart's tokens (`loom convert from-hf --data`: Loom's specials and the visual codes start from the mean
   of the text rows), and trained on the full mixture with the same recipe, with and without
   `optimizer.freeze_steps`;
3. the quickstart recipe from scratch on the same mixture.
Prints the held-out text, image and total loss of each run at every evaluation (the recipe evaluates every 100
steps) and the transferred runs' differences from scratch; writes OUT/transfer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from common.metrics import read_metrics  # noqa: E402
from data_pipeline.raw import SkipCounter  # noqa: E402
from data_pipeline.sources import iter_documents  # noqa: E402


def loom(*args) -> None:
    command = [sys.executable, "-m", "launch.cli", *map(str, args)]
    print("$ loom " + " ".join(map(str, args)), flush=True)
    start = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"  done in {time.time() - start:.0f}s: {result.stdout.strip().splitlines()[-1]}", flush=True)


def text_documents(raw: Path, out: Path) -> int:
    """The world's documents without their images and videos, as a `text` source (.jsonl)."""
    rows = [" ".join(s.text for s in segments if s.kind == "text")
            for _, segments in iter_documents([raw], SkipCounter())]
    out.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows if r.strip()))
    return len(rows)


def eval_losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", default="runs/quickstart", type=Path)
    parser.add_argument("--out", default="runs/transfer", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--freeze-steps", type=int, default=30)
    args = parser.parse_args()
    qs, out = args.quickstart.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = [REPO / "configs" / "quickstart.yaml", f"schedule.steps={args.steps}",
              f"schedule.warmup_steps={args.steps // 10}", "samples.interval=0",  # the recipe's 10% warmup
              "data.caption_dropout=0",  # the transfer is measured without the recipe's caption dropout
              f"eval.sources.shapes.path={qs / 'heldout' / 'tokens'}"]

    n = text_documents(qs / "raw", out / "text.jsonl")
    print(f"{n} documents' text -> {out / 'text.jsonl'}", flush=True)
    (out / "tokenize_text.yaml").write_text(json.dumps({
        "out_dir": str(out / "text_tokens"), "text_tokenizer": str(qs / "tokens" / "text_tokenizer.model"),
        "visual_tokenizer": str(qs / "tokenizers" / "vq"),
        "sources": [{"name": "text", "format": "text", "paths": [str(out / "text.jsonl")]}]}))
    loom("data", "tokenize", out / "tokenize_text.yaml")
    loom("train", *recipe, f"out_dir={out / 'text_model'}", f"data.sources.shapes.path={out / 'text_tokens' / 'text'}")
    loom("convert", "to-hf", out / "text_model", out / "text_model_hf", "--format", "llama",
         "--data", qs / "tokens")
    loom("convert", "from-hf", out / "text_model_hf", out / "imported", "--data", qs / "tokens")
    new_rows_from = yaml.safe_load((out / "imported" / "config.yaml").read_text())["model"]["new_rows_from"]
    freeze = f"from text LLM, freeze {args.freeze_steps}"
    runs = {"scratch": (out / "scratch", []), "from text LLM": (out / "transfer", []),
            freeze: (out / "transfer_freeze", [f"optimizer.freeze_steps={args.freeze_steps}"])}
    for name, (run, extra) in runs.items():
        if name != "scratch":  # each transferred run starts from its own copy of the imported checkpoint
            shutil.copytree(out / "imported", run)
        loom("train", *recipe, f"out_dir={run}", f"data.sources.shapes.path={qs / 'tokens'}",
             f"model.new_rows_from={new_rows_from if name != 'scratch' else 0}", *extra)

    text_model = eval_losses(out / "text_model")
    results = {name: eval_losses(run) for name, (run, _) in runs.items()}
    kinds = ("text", "image", "total")
    print(f"\nheld-out loss (nats/token) on the quickstart's held-out mixture; text-only model after {args.steps} "
          f"steps: text {text_model[args.steps]['text']:.3f}")
    print(f"{'run':<28} {'step':>5} " + " ".join(f"{k:>8}" for k in kinds) + "   vs scratch: "
          + " ".join(f"{k:>7}" for k in kinds))
    for name, losses in results.items():
        for step, loss in sorted(losses.items()):
            base = results["scratch"][step]
            print(f"{name:<28} {step:>5} " + " ".join(f"{loss[k]:>8.3f}" for k in kinds) + "               "
                  + " ".join(f"{loss[k] - base[k]:>+7.3f}" for k in kinds))
    (out / "transfer.json").write_text(json.dumps({"text_model": text_model, "runs": results}, indent=2))
    print(f"\nllm_transfer: 4 runs of {args.steps} steps; table in {out / 'transfer.json'}")


if __name__ == "__main__":
    main()
