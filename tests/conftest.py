"""Shared fixtures: one tiny shapes world, its tokenizers and token shards, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Raw shards, tokenizers and token shards of a 160-document world (about 20 s on 2 cores)."""
    from data_pipeline.shapes import write_world
    from data_pipeline.text_tokenizer import train_text_tokenizer
    from data_pipeline.tokenize_job import tokenize
    from data_pipeline.vq_config import load_vq_config
    from data_pipeline.vq_train import train_vq

    root = tmp_path_factory.mktemp("world")
    torch.set_num_threads(2)
    write_world(root / "raw", 160, seed=0, docs_per_shard=40)
    write_world(root / "heldout_raw", 40, seed=1, docs_per_shard=20)
    train_text_tokenizer([root / "raw"], root / "tok", vocab_size=400)
    train_vq(load_vq_config(None, [f"out_dir={root / 'tok' / 'vq'}", f"data.raw=[{root / 'raw'}]",
                                   "model.codebook_size=256", "optim.steps=8", "optim.batch_size=8",
                                   "logging.tensorboard=false"]), log=lambda m: None)
    quiet = lambda m: None  # noqa: E731
    tokenize([root / "raw"], root / "tokens", root / "tok" / "text_tokenizer.model", root / "tok" / "vq", 32, 8,
             log=quiet)
    tokenize([root / "heldout_raw"], root / "heldout_tokens", root / "tok" / "text_tokenizer.model",
             root / "tok" / "vq", 32, 8, log=quiet)
    return root


def copy_with_fingerprint(src: Path, dst: Path, json_name: str, fingerprint: str) -> Path:
    """A copy of a token directory whose `json_name` file claims another vocabulary fingerprint."""
    import json
    import shutil

    shutil.copytree(src, dst)
    data = json.loads((dst / json_name).read_text())
    data["fingerprint"] = fingerprint
    (dst / json_name).write_text(json.dumps(data))
    return dst


def spans_of(token_dir: Path, manifest: dict):
    """(kind, span as a list of ids) of every modality span of every document of token shards."""
    import json

    from data_pipeline.shards import iter_samples, npy_load

    for shard in manifest["shards"]:
        for sample in iter_samples(token_dir / shard):
            tokens = npy_load(sample["tokens.npy"])
            for start, end, kind in json.loads(sample["spans.json"]):
                yield kind, tokens[start:end].tolist()


def assert_image_grid(span: list, vocabulary, text, h: int, w: int) -> None:
    """An image span in the Emu3 layout: <|image start|> "h*w" <|image token|>, h rows of w visual ids each ended
    by <|eol|>, then <|eof|> <|image end|>."""
    import numpy as np

    L = vocabulary
    prefix = [L.special("<|image start|>")] + text.encode(f"{h}*{w}") + [L.special("<|image token|>")]
    assert span[:len(prefix)] == prefix
    grid = np.array(span[len(prefix):-2]).reshape(h, w + 1)
    assert (grid[:, w] == L.special("<|eol|>")).all()
    assert (grid[:, :w] >= L.visual_offset).all() and (grid[:, :w] < L.size).all()
    assert span[-2:] == [L.special("<|eof|>"), L.special("<|image end|>")]


def run_loom(*args, cwd=None, timeout=600, env=None):
    """Run the `loom` CLI in a fresh interpreter; returns the CompletedProcess (text output)."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def groups():
    """A one-process gloo group with megatron's TP/PP groups, as torchrun would give one rank."""
    from pretrain.parallel import single_process_groups

    single_process_groups()


TINY_MODEL = ["model.dim=64", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=176"]


def train_tiny(world, out, nproc, *overrides, env=None, ok=True):
    """6 steps of a 4-layer model, checkpoints at steps 3 and 6 (both kept)."""
    result = run_loom("train", REPO / "configs" / "tiny.yaml", f"out_dir={out}",
                      f"data.sources.shapes.path={world / 'tokens'}", f"parallel.nproc_per_node={nproc}",
                      "schedule.steps=6", "schedule.warmup_steps=2", "checkpoint.interval=3", "checkpoint.keep_last=3",
                      "data.micro_batch_size=2", "logging.interval=1", *TINY_MODEL, *overrides, env=env)
    if ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_args(world, out, *extra):
    """`loom train` of configs/tiny.yaml: 2 processes, 6 steps, checkpoints at 3 and 6, evaluation at 0 and 6."""
    return ["train", REPO / "configs" / "tiny.yaml", f"out_dir={out}", f"data.sources.shapes.path={world / 'tokens'}",
            f"eval.sources.shapes.path={world / 'heldout_tokens'}", "eval.sequences=8", "schedule.steps=6",
            "schedule.warmup_steps=2", "checkpoint.interval=3", "logging.interval=1", *extra]


def train_losses(out):
    from common.metrics import read_metrics

    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(out) if "loss" in r]


@pytest.fixture(scope="session")
def trained(world, tmp_path_factory):
    """The uninterrupted reference run of `train_args` (runs under faults are compared with it)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    result = run_loom(*train_args(world, out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


SOURCE_LAYOUTS = {"tp2-pp2-zero1": ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"],
                  "tp2-pp2-zero1-bf16": ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1",
                                         "parallel.bf16=true"],
                  "tp2-dp2-zero3": ["parallel.tp=2", "parallel.zero_stage=3"],
                  "cp2-tp2-zero2": ["parallel.cp=2", "parallel.tp=2", "parallel.zero_stage=2"]}


@pytest.fixture(scope="session")
def sources(world, tmp_path_factory):
    """Runs of the emu3 preset in TP2xPP2 (ZeRO-1, fp32 and bf16), TP2xDP2 (ZeRO-3) and CP2xTP2 (ZeRO-2), 4 processes
    each."""
    root = tmp_path_factory.mktemp("sources")
    for name, layout in SOURCE_LAYOUTS.items():
        train_tiny(world, root / name, 4, *layout)
    return root
