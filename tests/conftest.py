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
    from data_pipeline.tokenize import tokenize
    from data_pipeline.visual_tokenizer import VQTrainConfig, train_visual_tokenizer

    root = tmp_path_factory.mktemp("world")
    torch.set_num_threads(2)
    write_world(root / "raw", 160, seed=0, docs_per_shard=40)
    write_world(root / "heldout_raw", 40, seed=1, docs_per_shard=20)
    train_text_tokenizer([root / "raw"], root / "tok", vocab_size=400)
    train_visual_tokenizer([root / "raw"], root / "tok" / "vq", VQTrainConfig(steps=8, batch_size=8),
                           log=lambda m: None)
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


def run_loom(*args, cwd=None, timeout=600, env=None):
    """Run the `loom` CLI in a fresh interpreter; returns the CompletedProcess (text output)."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=full_env)
