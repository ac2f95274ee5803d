"""ShapesEval of a trained checkpoint against its own initialisation, and generation speed with the KV
cache against full recomputation, in one run.

    python benchmarks/shapes_eval.py runs/quickstart/train [--n 32] [--cfg-scale 1] [--temperature 0.7]

The untrained model is the run's step 0 (`Generator.untrained`). Prints the per-category table for both,
then images/s of text-to-image sampling with and without the cache and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from analysis.generate import Generator, Sampling  # noqa: E402
from analysis.shapes_eval import CATEGORIES, shapes_eval  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=32, help="prompts per category")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="guidance (default: none, as the quickstart)")
    parser.add_argument("--temperature", type=float, default=0.7, help="default: the quickstart recipe's samples")
    parser.add_argument("--speed-images", type=int, default=16, help="images for the cache/no-cache timing")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    trained = Generator.from_checkpoint(args.checkpoint)
    cfg, untrained = trained.model.cfg, trained.untrained()
    sampling = Sampling(temperature=args.temperature, cfg_scale=args.cfg_scale)
    results = {}
    for name, gen in (("untrained (step 0)", untrained), (f"trained (step {trained.checkpoint['step']})", trained)):
        start = time.time()
        results[name] = shapes_eval(gen, args.n, sampling)["accuracy"]
        print(f"{name}: {time.time() - start:.0f}s", flush=True)
    print(f"\nShapesEval, {args.n} prompts per category, cfg scale {args.cfg_scale}, temperature {args.temperature}")
    print(f"{'category':<18} " + " ".join(f"{name:>22}" for name in results))
    for category in (*CATEGORIES, "overall"):
        print(f"{category:<18} " + " ".join(f"{100 * acc[category]:>21.1f}%" for acc in results.values()))

    prompts = ["A red circle on the left."] * args.speed_images
    speed = {}
    for use_cache in (True, False):
        start = time.time()
        trained.image_codes(prompts, sampling, use_cache=use_cache)
        speed[use_cache] = len(prompts) / (time.time() - start)
    print(f"\ntext-to-image sampling ({cfg.n_layers} layers, dim {cfg.dim}, batch {len(prompts)}, "
          f"cfg scale {args.cfg_scale}): "
          f"{speed[True]:.1f} images/s with the KV cache, {speed[False]:.1f} without; "
          f"ratio {speed[True] / speed[False]:.2f}x")


if __name__ == "__main__":
    main()
