"""`loom generate`, `loom eval nll` and `loom eval shapes`: sample from a checkpoint, score it."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def add_sampling_args(p: argparse.ArgumentParser, cfg_scale: float, temperature: float,
                      checkpoint_help: str = ("a checkpoint folder or a run directory (its latest checkpoint), "
                                              "any layout")) -> None:
    p.add_argument("checkpoint", help=checkpoint_help)
    p.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--cfg-scale", type=float, default=cfg_scale, help="classifier-free guidance for images/video "
                   "(1: off)")
    p.add_argument("--negative-prompt", default="", help="text of guidance's unconditional branch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="token directory whose vocab.json gives the tokenizers "
                   "(default: the run's first data source)")
    p.add_argument("--visual-tokenizer", default=None, help="Emu3VQVAE directory (default: the one vocab.json "
                   "records)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--bf16", action="store_true", help="the transformer in bf16 (sampling math stays fp32)")


def sampling_of(args):
    from analysis.generate import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
                    negative_prompt=args.negative_prompt, max_new_tokens=getattr(args, "max_new_tokens", 64),
                    seed=args.seed)


def open_generator(args):
    import torch

    from analysis.generate import Generator

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Generator.from_checkpoint(args.checkpoint, args.data, args.visual_tokenizer, device,
                                     torch.bfloat16 if args.bf16 else torch.float32)


def parse_grid(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--grid takes HxW in visual tokens, e.g. 4x4; got {text!r}") from None
    return h, w


def cmd_generate(args) -> int:
    from data_pipeline.media import decode_image, encode_png
    from analysis.generate import save_video

    gen = open_generator(args)
    s = sampling_of(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    start, records = time.time(), []
    if args.mode == "caption":
        if not args.image:
            raise ValueError("--mode caption needs --image FILE [FILE ...]")
        images = [decode_image(Path(f).read_bytes()) for f in args.image for _ in range(args.n)]
        texts = gen.caption(images, s, prompt=args.prompt[0] if args.prompt else "")
        records = [{"image": f, "text": t} for f, t in zip([f for f in args.image for _ in range(args.n)], texts)]
    elif not prompts:
        raise ValueError(f"--mode {args.mode} needs --prompt TEXT [TEXT ...]")
    elif args.mode == "text":
        records = [{"prompt": p, "text": t} for p, t in zip(prompts, gen.continue_text(prompts, s))]
    elif args.mode == "image":
        for i, (p, rgb) in enumerate(zip(prompts, gen.images(prompts, s, parse_grid(args.grid)))):
            (out / f"{i:03d}.png").write_bytes(encode_png(rgb))
            records.append({"prompt": p, "file": f"{i:03d}.png"})
    else:
        for i, (p, frames) in enumerate(zip(prompts, gen.videos(prompts, s, args.frames, parse_grid(args.grid)))):
            save_video(frames, out / f"{i:03d}.{args.video_format}")
            records.append({"prompt": p, "file": f"{i:03d}.{args.video_format}"})
    with open(out / "samples.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
            print(json.dumps(r))
    print(f"generate: {len(records)} {args.mode} samples from {gen.model.cfg.n_layers}-layer model in "
          f"{time.time() - start:.1f}s -> {out}")
    return 0


def image_row(images: list[np.ndarray]) -> np.ndarray:
    """Images side by side with a 2-pixel white gap, (H, W*, 3) uint8."""
    gap = np.full((images[0].shape[0], 2, 3), 255, dtype=np.uint8)
    return np.concatenate([part for im in images for part in (im, gap)][:-1], axis=1)


def cmd_eval_shapes(args) -> int:
    from analysis.shapes_eval import CATEGORIES, format_table, shapes_eval
    from analysis.transformers_images import TransformersImages, is_emu3_export
    from data_pipeline.media import encode_png

    if is_emu3_export(args.checkpoint):  # an export, drawn through transformers' processor and generate
        gen = TransformersImages(args.checkpoint, args.device or "cpu")
    else:
        gen = open_generator(args)
    start = time.time()
    result = shapes_eval(gen, args.n, sampling_of(args), seed=args.seed) if args.n else {"accuracy": {}, "samples": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {c: image_row([s["image"] for s in result["samples"] if s["category"] == c]) for c in CATEGORIES
            if args.n}
    for category, row in rows.items():
        (out / f"{category}.png").write_bytes(encode_png(row))
    prompt_images = gen.images(args.prompt, sampling_of(args)) if args.prompt else []
    for i, rgb in enumerate(prompt_images):
        (out / f"prompt_{i:02d}.png").write_bytes(encode_png(rgb))
    report = {"checkpoint": str(args.checkpoint), "step": args.step, "per_category": args.n,
              "cfg_scale": args.cfg_scale, "temperature": args.temperature, "accuracy": result["accuracy"],
              "samples": [{k: v for k, v in s.items() if k != "image"} for s in result["samples"]],
              "prompts": args.prompt}
    (out / "shapes_eval.json").write_text(json.dumps(report, indent=2))
    if args.tensorboard:
        log_tensorboard(args.tensorboard, args.step, result["accuracy"], rows, args.prompt, prompt_images)
    if args.n:
        print(format_table(result["accuracy"], args.n))
    overall = f"overall accuracy {100 * result['accuracy']['overall']:.1f}%" if args.n else "no ShapesEval (--n 0)"
    print(f"eval shapes: {len(result['samples']) + len(prompt_images)} images in {time.time() - start:.0f}s, "
          f"{overall}; report and images in {out}")
    return 0


def log_tensorboard(logdir: str, step: int, accuracy: dict, rows: dict, prompts: list[str], images: list) -> None:
    """Scalars shapes_eval/<category>, one image row per category and the fixed prompts' images, at `step`."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(logdir, filename_suffix=".samples") as writer:
        for name, value in accuracy.items():
            writer.add_scalar(f"shapes_eval/{name}", value, step)
        for category, row in rows.items():
            writer.add_image(f"shapes_eval/{category}", row, step, dataformats="HWC")
        for i, (prompt, rgb) in enumerate(zip(prompts, images)):
            writer.add_image(f"samples/{i:02d}", rgb, step, dataformats="HWC")
            writer.add_text(f"samples/{i:02d}", prompt, step)


def cmd_eval_nll(args) -> int:
    import json

    import torch

    from analysis.nll import evaluate_nll

    torch.set_num_threads(args.threads or os.cpu_count())
    result = evaluate_nll(args.checkpoint, args.data, args.max_tokens, args.seq_len)
    text = json.dumps(result, indent=2)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def add_parsers(sub) -> None:
    evals = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="eval_command", required=True,
                                                                              metavar="EVAL")
    p = evals.add_parser("nll", help="mean loss per modality on token shards (one process, any layout)")
    p.add_argument("checkpoint")
    p.add_argument("--data", nargs="+", required=True, help="token directories")
    p.add_argument("--max-tokens", type=int, default=100_000, help="sequence positions to evaluate")
    p.add_argument("--seq-len", type=int, default=0, help="row length (default: the checkpoint's data.seq_len)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_eval_nll)

    p = sub.add_parser("generate", help="sample text, images, video or captions from a checkpoint (KV cache)")
    add_sampling_args(p, cfg_scale=3.0, temperature=1.0)
    p.add_argument("--mode", choices=["text", "image", "video", "caption"], default="image")
    p.add_argument("--prompt", nargs="*", default=[], help="prompts (caption mode: optional text after the image)")
    p.add_argument("--image", nargs="*", default=[], help="caption mode: image files")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--out", default="samples", help="output directory (images, videos, samples.jsonl)")
    p.add_argument("--grid", default=None, help="image/video grid HxW in visual tokens (default: the training "
                   "image size / 8)")
    p.add_argument("--frames", type=int, default=8, help="video frames (a multiple of 4)")
    p.add_argument("--video-format", choices=["gif", "mp4"], default="gif")
    p.add_argument("--max-new-tokens", type=int, default=64, help="text and caption length limit")
    p.set_defaults(func=cmd_generate)

    p = evals.add_parser("shapes", help="ShapesEval: GenEval's categories on the shapes world, scored by pixels")
    add_sampling_args(p, cfg_scale=3.0, temperature=1.0, checkpoint_help="a checkpoint folder or run directory (any "
                      "layout), or an Emu3 directory of `loom convert to-hf` (drawn through transformers)")
    p.add_argument("--n", type=int, default=32, help="prompts per category (0: only --prompt)")
    p.add_argument("--out", default="shapes_eval", help="output directory (shapes_eval.json, image rows)")
    p.add_argument("--prompt", nargs="*", default=[], help="extra prompts to draw and save (and log)")
    p.add_argument("--tensorboard", default=None, help="also log scalars and images to this TensorBoard dir")
    p.add_argument("--step", type=int, default=0, help="the step to log at (TensorBoard)")
    p.set_defaults(func=cmd_eval_shapes)
