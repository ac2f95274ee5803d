"""The `loom` command. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import os
import sys
import warnings


class UserError(Exception):
    """An error whose message is all the user needs (no traceback)."""


def cmd_train(args) -> int:
    from pretrain.config import TrainConfig, build, load_config, load_tree, validate

    from .torchrun import check_sources, inside_torchrun, run_torchrun

    if not inside_torchrun():  # fail fast, before any process starts
        cfg = build(TrainConfig, load_tree(args.config, args.overrides))
        validate(cfg, world_size=cfg.parallel.nproc_per_node)
        check_sources(cfg)
        return run_torchrun((["--debug"] if args.debug else []) + ["train", args.config, *args.overrides],
                            cfg.parallel.nproc_per_node)
    from pretrain.train import train

    train(load_config(args.config, args.overrides))
    return 0


def cmd_config(args) -> int:
    from pretrain.config import describe, load_config, to_dict

    if args.config is None and not args.overrides:
        print("\n".join(describe()))
        return 0
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_synth(args) -> int:
    from tqdm import tqdm

    from data_pipeline.shapes import WorldSpec, write_world

    with tqdm(total=args.docs, desc="synth", unit="doc", disable=None) as bar:
        summary = write_world(args.out, args.docs, args.seed, WorldSpec(image_size=args.image_size),
                              args.docs_per_shard, progress=bar)
    print(f"synth: wrote {summary['documents']} documents ({summary['by_kind']}) in "
          f"{summary['shards']} shards to {args.out}")
    return 0


def cmd_text_tokenizer(args) -> int:
    from data_pipeline.text_tokenizer import train_text_tokenizer

    s = train_text_tokenizer(args.raw, args.out, args.vocab_size)
    print(f"text tokenizer: {s['vocab_size']} pieces from {s['sentences']} text segments "
          f"({s['skipped']['total']} samples skipped) -> {s['path']}")
    return 0


def cmd_visual_tokenizer(args) -> int:
    import torch

    from data_pipeline.visual_tokenizer import VQTrainConfig, train_visual_tokenizer

    torch.set_num_threads(args.threads or os.cpu_count())
    cfg = VQTrainConfig(steps=args.steps, codebook_size=args.codebook_size, image_size=args.image_size,
                        batch_size=args.batch_size, seed=args.seed)
    s = train_visual_tokenizer(args.raw, args.out, cfg)
    print(f"visual tokenizer: {s['steps']} steps on {s['clips']} clips, PSNR {s['psnr']:.2f} dB, "
          f"{s['codes_used_on_eval']}/{s['codebook_size']} codes used, {s['seconds']}s -> {args.out}")
    return 0


def cmd_tokenize(args) -> int:
    import torch

    from data_pipeline.tokenize import tokenize

    torch.set_num_threads(args.threads or os.cpu_count())
    m = tokenize(args.raw, args.out, args.text_tokenizer, args.visual_tokenizer, args.image_size,
                 args.video_frames)
    print(f"tokenize: {m['documents']} documents, tokens {m['tokens']}, skipped {m['skipped'] or 0}, "
          f"fingerprint {m['fingerprint']} -> {args.out}")
    return 0


def cmd_quickstart(args) -> int:
    from .quickstart import quickstart

    return quickstart(args.out, args.docs, args.steps, args.vq_steps, force=args.force)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="Pretrain unified multimodal autoregressive models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="run every stage on the shapes world and train a model")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--docs", type=int, default=3000, help="documents to synthesize")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--vq-steps", type=int, default=None, help="visual tokenizer training steps (default 150)")
    p.add_argument("--force", action="store_true", help="redo stages that are already done")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("train", help="train a model (starts torchrun when not under it)")
    p.add_argument("config", help="YAML recipe, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=3e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="print the resolved config, or every field with its documentation")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)

    data = sub.add_parser("data", help="data stages: synth, tokenizers, tokenize").add_subparsers(
        dest="data_command", required=True, metavar="STAGE")
    p = data.add_parser("synth", help="write raw shards of the shapes world")
    p.add_argument("--out", required=True)
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--docs-per-shard", type=int, default=500)
    p.set_defaults(func=cmd_synth)

    p = data.add_parser("text-tokenizer", help="train the sentencepiece BPE text tokenizer on raw shards")
    p.add_argument("--raw", nargs="+", required=True, help="raw shard directories")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=512)
    p.set_defaults(func=cmd_text_tokenizer)

    p = data.add_parser("visual-tokenizer", help="train the VQ visual tokenizer on raw shards")
    p.add_argument("--raw", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.set_defaults(func=cmd_visual_tokenizer)

    p = data.add_parser("tokenize", help="raw shards -> token shards + manifest.json")
    p.add_argument("--raw", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--text-tokenizer", required=True, help="sentencepiece .model file")
    p.add_argument("--visual-tokenizer", required=True, help="Emu3VQVAE directory")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--video-frames", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_tokenize)
    return parser


def quiet_known_warnings() -> None:
    """Warnings that say nothing actionable on a CPU or a plain-torch install."""
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    warnings.filterwarnings("ignore", message=".*_get_global_rank.* is deprecated")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("loom: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; the traceback with --debug
        if args.debug:
            raise
        print(f"loom: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
