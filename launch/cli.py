"""The `loom` command: the parser of every command group, and the one way errors reach the user.

Each group's commands are thin wrappers over library functions, in a module of their own:
train_commands (train, launch, plan, config), data_commands (quickstart, data ...),
checkpoint_commands (convert, ckpt), eval_commands (eval, generate), sweep_commands (sweep).
Their library imports sit inside the commands, so that `loom --help` starts without torch.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import warnings

from . import checkpoint_commands, data_commands, eval_commands, sweep_commands, train_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="Pretrain unified multimodal autoregressive models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (data_commands, train_commands, checkpoint_commands, eval_commands, sweep_commands):
        group.add_parsers(sub)
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
    # `kill -USR1 PID` prints where a process is stuck, to the process's real stderr
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
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
