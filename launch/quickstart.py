"""`loom quickstart`: every stage on the shapes world, skipping stages already done.

    OUT/raw/           raw-document shards (loom data synth); OUT/heldout/raw/ a held-out world
    OUT/tokenizers/    text_tokenizer.model and vq/ (an HF Emu3VQVAE directory)
    OUT/tokens/        token shards + manifest.json (loom data tokenize); OUT/heldout/tokens/
    OUT/train/         checkpoints/, tensorboard/, metrics.jsonl, config.yaml, summary.json
    OUT/quickstart.json  the final summary

A stage counts as done when its last file exists (each stage writes that file last and atomically),
so an interrupted quickstart continues where it stopped and never rewrites a finished stage.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from data_pipeline.shards import read_json

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
VQ_RECIPE = RECIPE.parent / "visual_tokenizer" / "quickstart.yaml"
NPROC = 2
HELDOUT_DOCS = 300
IMAGE_SIZE = 64  # 8x8 codes per image; the visual tokenizer reaches 25 dB here within its 10-minute budget


def stage(name: str, done: bool, force: bool, run) -> None:
    if done and not force:
        print(f"[quickstart] {name}: done already, skipped", flush=True)
        return
    start = time.time()
    print(f"[quickstart] {name} ...", flush=True)
    run()
    print(f"[quickstart] {name}: finished in {time.time() - start:.0f}s", flush=True)


def learning_checks(summary: dict, codebook_size: int) -> list[tuple[str, bool]]:
    """The quickstart's bar, on held-out documents: text loss halves, image codes beat chance by 1 nat."""
    init, final = summary["initial_eval_loss"], summary["final_eval_loss"]
    checks = [(f"held-out text loss {final['text']:.3f} < half its initial {init['text']:.3f}",
               final["text"] < init["text"] / 2)]
    bound = math.log(codebook_size) - 1
    checks.append((f"held-out image-token loss {final['image']:.3f} <= ln({codebook_size}) - 1 = {bound:.3f}",
                   final["image"] <= bound))
    return checks


def quickstart(out: str, docs: int, steps: int | None, vq_steps: int | None = None, force: bool = False) -> int:
    from data_pipeline.shapes import WorldSpec, write_world
    from data_pipeline.text_tokenizer import train_text_tokenizer
    from data_pipeline.tokenize_job import tokenize
    from data_pipeline.vq_config import VQConfig, load_vq_config
    from data_pipeline.vq_train import train_vq
    from common.config import build, load_tree
    from pretrain.config import load_config

    from .torchrun import run_torchrun

    out_dir = Path(out)
    raw, tok_dir, tokens, train_dir = out_dir / "raw", out_dir / "tokenizers", out_dir / "tokens", out_dir / "train"
    heldout_raw, heldout_tokens = out_dir / "heldout" / "raw", out_dir / "heldout" / "tokens"
    spec = WorldSpec(image_size=IMAGE_SIZE)
    vq_overrides = [f"out_dir={tok_dir / 'vq'}", f"data.raw=[{raw}]"] + \
        ([f"optim.steps={vq_steps}"] if vq_steps is not None else [])
    torch.set_num_threads(os.cpu_count() or 1)
    begin = time.time()
    stage("synthesize the shapes world", (raw / "world.json").exists(), force,
          lambda: print(f"  {write_world(raw, docs, seed=0, spec=spec, docs_per_shard=500)}"))
    stage("synthesize a held-out world", (heldout_raw / "world.json").exists(), force,
          lambda: print(f"  {write_world(heldout_raw, HELDOUT_DOCS, seed=1, spec=spec)}"))
    stage("train the text tokenizer", (tok_dir / "text_tokenizer.model").exists(), force,
          lambda: train_text_tokenizer([raw], tok_dir, vocab_size=512))
    stage("train the visual tokenizer", (tok_dir / "vq" / "loom_vq_train.json").exists(), force,
          lambda: train_vq(load_vq_config(VQ_RECIPE, vq_overrides), log=lambda m: print("  " + m, flush=True)))
    stage("tokenize", (tokens / "manifest.json").exists(), force,
          lambda: tokenize([raw], tokens, tok_dir / "text_tokenizer.model", tok_dir / "vq", spec.image_size,
                           spec.video_frames, log=lambda m: print("  " + m, flush=True)))
    stage("tokenize the held-out world", (heldout_tokens / "manifest.json").exists(), force,
          lambda: tokenize([heldout_raw], heldout_tokens, tok_dir / "text_tokenizer.model", tok_dir / "vq",
                           spec.image_size, spec.video_frames, log=lambda m: print("  " + m, flush=True)))
    overrides = [f"out_dir={train_dir}", f"data.sources.shapes.path={tokens}",
                 f"eval.sources.shapes.path={heldout_tokens}", f"parallel.nproc_per_node={NPROC}"]
    if steps is not None:
        overrides.append(f"schedule.steps={steps}")
    cfg = load_config(RECIPE, overrides)

    def run_training():
        code = run_torchrun(["train", str(RECIPE), *overrides], NPROC)
        if code:
            raise RuntimeError(f"training failed (exit code {code}); the earlier stages' outputs are kept")

    summary_file = train_dir / "summary.json"
    finished = summary_file.exists() and read_json(summary_file).get("steps") == cfg.schedule.steps
    stage("train the model (torchrun, 2 processes, ZeRO-1)", finished, force, run_training)
    summary = read_json(summary_file)
    checks = learning_checks(summary, build(VQConfig, load_tree(VQ_RECIPE, vq_overrides)).model.codebook_size)
    result = {**summary, "checks": {text: ok for text, ok in checks}, "seconds": round(time.time() - begin)}
    (out_dir / "quickstart.json").write_text(json.dumps(result, indent=2))
    print("\n[quickstart] summary")
    for kind in summary["final_eval_loss"]:
        print(f"  {kind:>16} held-out loss: {summary['initial_eval_loss'][kind]:.3f} -> "
              f"{summary['final_eval_loss'][kind]:.3f}   (training loss, last 10 steps: "
              f"{summary['final_loss'].get(kind, float('nan')):.3f})")
    print(f"  tokens seen (with loss): {summary['consumed_tokens']}")
    if summary.get("shapes_eval"):
        from analysis.shapes_eval import format_table

        print(f"  ShapesEval of the final checkpoint ({train_dir / 'shapes_eval'}):")
        table = format_table(summary["shapes_eval"], cfg.samples.shapes_eval_per_category)
        print("    " + table.replace("\n", "\n    "))
    for text, ok in checks:
        print(f"  [{'ok' if ok else 'FAILED'}] {text}")
    print(f"  checkpoint:  {summary['checkpoint']}")
    print(f"  TensorBoard: tensorboard --logdir {summary['tensorboard']}")
    print(f"quickstart: {'learned' if all(ok for _, ok in checks) else 'did NOT meet the learning checks'}; "
          f"{summary['steps']} steps, {summary['consumed_tokens']['total']} loss tokens, "
          f"{result['seconds']}s this invocation; outputs in {out_dir}")
    return 0 if all(ok for _, ok in checks) else 3
