"""`loom convert` and `loom ckpt`: checkpoints to and from Hugging Face, and their inspection."""

from __future__ import annotations


def cmd_to_hf(args) -> int:
    from checkpoints_utils.convert import export_hf

    export_hf(args.checkpoint, args.out, args.format, args.visual_tokenizer, args.data)
    return 0


def cmd_from_hf(args) -> int:
    from checkpoints_utils.convert import import_hf

    import_hf(args.hf_dir, args.out, data=args.data, noise=args.noise, seed=args.seed)
    return 0


def cmd_inspect(args) -> int:
    import json

    from checkpoints_utils.reader import inspect

    report = inspect(args.checkpoint, check=not args.no_verify)
    print(json.dumps(report, indent=2))
    return 0 if report.get("manifest", "ok").startswith("ok") and report["complete"] else 1


def cmd_consolidate(args) -> int:
    from checkpoints_utils.reader import consolidate

    consolidate(args.checkpoint, check=not args.no_verify)
    return 0


def add_parsers(sub) -> None:
    convert = sub.add_parser("convert", help="Loom checkpoints <-> Hugging Face directories").add_subparsers(
        dest="convert_command", required=True, metavar="DIRECTION")
    p = convert.add_parser("to-hf", help="export a checkpoint (any layout) to a transformers directory")
    p.add_argument("checkpoint", help="a checkpoint folder or a run directory (its latest checkpoint)")
    p.add_argument("out")
    p.add_argument("--format", choices=["emu3", "chameleon", "llama", "qwen2"], default="emu3")
    p.add_argument("--visual-tokenizer", default=None, help="Emu3VQVAE directory (emu3; default: the one the "
                   "token shards were made with, recorded in their vocab.json)")
    p.add_argument("--data", default=None, help="token directory whose vocab.json and text tokenizer give "
                   "the tokenizer (default: the run's first data source)")
    p.set_defaults(func=cmd_to_hf)
    p = convert.add_parser("from-hf", help="import a Llama (3.x included), Qwen2, Emu3 or Chameleon directory as a "
                                           "Loom run")
    p.add_argument("hf_dir")
    p.add_argument("out", help="run directory to create; continue with `loom train OUT/config.yaml ...`")
    p.add_argument("--data", default=None, help="token directory tokenized with the model's own tokenizer: grow the "
                   "embedding and output to its vocabulary (Loom's specials and the visual codes) and train on it")
    p.add_argument("--noise", type=float, default=0.01, help="new rows: the mean of the old rows plus this times "
                   "their standard deviation of Gaussian noise, per dimension")
    p.add_argument("--seed", type=int, default=0, help="seed of that noise")
    p.set_defaults(func=cmd_from_hf)

    ckpt = sub.add_parser("ckpt", help="checkpoint tools").add_subparsers(dest="ckpt_command", required=True,
                                                                          metavar="TOOL")
    p = ckpt.add_parser("inspect", help="step, layout, tokens seen, fingerprint, size, completeness")
    p.add_argument("checkpoint")
    p.add_argument("--no-verify", action="store_true", help="skip checking every file against the manifest")
    p.set_defaults(func=cmd_inspect)
    p = ckpt.add_parser("consolidate", help="write a checkpoint's layout-free form (CKPT/portable) ahead of resuming "
                        "it under another layout, one parameter at a time")
    p.add_argument("checkpoint")
    p.add_argument("--no-verify", action="store_true", help="skip checking every file against the manifest")
    p.set_defaults(func=cmd_consolidate)
