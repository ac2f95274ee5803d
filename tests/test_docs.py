"""The README and the guides under docs/ stay true: every `loom` command in a fenced block parses with the CLI's
own parser (nothing runs), and every recipe and benchmark they name exists."""

from __future__ import annotations

import re
import shlex

import pytest

from conftest import REPO
from launch.cli import build_parser

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_OPERATORS = {">", ">>", "|", "&&", "||", ";", "&", "2>&1"}


def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def loom_commands(block: str) -> list[list[str]]:
    """The argument lists of the `loom ...` (or `python -m launch.cli ...`) command lines of a shell block."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\$\{?\w+\}?", "1", line)  # shell variables ($SLURM_NNODES): any value of the right kind
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):  # VAR=value before the command
            words = words[1:]
        if words[:1] == ["srun"]:
            words = words[next((i for i, w in enumerate(words) if w == "python"), len(words)):]
        if words[:3] == ["python", "-m", "launch.cli"]:
            words = ["loom", *words[3:]]
        if words[:1] != ["loom"]:
            continue
        cut = next((i for i, w in enumerate(words) if w in SHELL_OPERATORS), len(words))
        commands.append(words[1:cut])
    return commands


def documented_commands() -> list[tuple[str, list[str]]]:
    return [(f"{path.relative_to(REPO)}: loom {shlex.join(args)}", args)
            for path in DOCS for block in fenced_blocks(path.read_text()) for args in loom_commands(block)]


def test_the_docs_show_commands_of_every_group():
    shown = {args[0] for _, args in documented_commands()}
    assert {"quickstart", "train", "launch", "plan", "config", "data", "convert", "ckpt", "eval", "generate",
            "sweep"} <= shown


@pytest.mark.parametrize("where,args", documented_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_documented_command_parses(where, args):
    try:
        build_parser().parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"{where} does not parse (exit {e.code})") from None


def test_every_named_recipe_and_benchmark_exists():
    missing = []
    for path in DOCS:
        text = path.read_text()
        for name in set(re.findall(r"\bconfigs/[\w./-]+\.yaml\b", text)) | \
                set(re.findall(r"\bbenchmarks/[\w./-]+\.(?:py|sh)\b", text)):
            if not (REPO / name).exists():
                missing.append(f"{path.relative_to(REPO)}: {name}")
    assert not missing, "named but missing:\n" + "\n".join(missing)


def test_the_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for guide in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{guide.name})" in readme, f"README.md does not link docs/{guide.name}"
        first_block = fenced_blocks(guide.read_text())[0]
        assert loom_commands(first_block), f"docs/{guide.name} does not open with a runnable loom example"


def test_the_command_reader_finds_a_broken_command():
    block = "NCCL_X=1 loom train configs/tiny.yaml \\\n    out_dir=x  # a comment\nloom trian configs/tiny.yaml > log\n"
    assert loom_commands(block) == [["train", "configs/tiny.yaml", "out_dir=x"], ["trian", "configs/tiny.yaml"]]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["trian", "configs/tiny.yaml"])


def test_every_link_between_the_docs_resolves():
    broken = [f"{path.relative_to(REPO)}: {link}" for path in DOCS
              for link in re.findall(r"\]\(([^)\s]+)\)", path.read_text())
              if "://" not in link and not (path.parent / link.split("#")[0]).exists()]
    assert not broken, "links to missing files:\n" + "\n".join(broken)
