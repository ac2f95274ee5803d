"""The layering of the code (docs/architecture.md): every import points down the stack, and nothing forms a cycle.

    launch              the `loom` CLI, torchrun and cluster launches
    analysis            evaluation, generation, samples, scaling-law sweeps and fits, the cluster plan
    checkpoints_utils   offline checkpoint tools: read any layout, inspect, Hugging Face conversion
    pretrain            model, parallelism, the training loop and its checkpoints
    data_pipeline       sources, tokenizers, token shards, the loader
    common              typed configs, checkpoint folders and manifests, metrics logging, process groups

Imports are read with `ast`, at module level and inside functions alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

LAYERS = ["common", "data_pipeline", "pretrain", "checkpoints_utils", "analysis", "launch"]


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for package in LAYERS for p in sorted((REPO / package).glob("*.py"))}


def project_imports(name: str, path: Path, known: dict) -> list[tuple[str, int, bool]]:
    """(imported Loom module, line, inside a function) for every import of a Loom module in `path`."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = (f"{package}.{node.module}" if node.module else package) if node.level else node.module
            # `from pkg import mod` imports the module pkg.mod; `from pkg.mod import name`, pkg.mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found += [(t, node.lineno, node.col_offset > 0) for t in dict.fromkeys(targets) if t.split(".")[0] in LAYERS]
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    known = modules()
    return {name: project_imports(name, path, known) for name, path in known.items()}


def test_every_import_points_down_the_stack():
    upward = [f"{REPO / (name.replace('.', '/'))}.py:{line} imports {target}"
              for name, edges in graph().items() for target, line, _ in edges
              if LAYERS.index(target.split(".")[0]) > LAYERS.index(name.split(".")[0])]
    assert not upward, "imports that point up the stack:\n" + "\n".join(upward)


def test_no_module_imports_itself_back():
    edges = {name: {t for t, _, _ in targets if t != name} for name, targets in graph().items()}
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_project_imports_sit_at_module_level_outside_the_cli():
    """A project import inside a function hides a dependency (and often a cycle). The CLI's commands import
    their libraries when they run, so that `loom --help` starts without torch."""
    hidden = [f"{name}:{line} imports {target}" for name, edges in graph().items() for target, line, nested in edges
              if nested and not name.startswith("launch")]
    assert not hidden, "project imports inside functions:\n" + "\n".join(hidden)


def test_nothing_below_the_cli_starts_the_cli():
    """A subprocess of `python -m launch.cli` from a library is a call up the stack: the CLI hands its own
    command down instead (the samples during training, the points of a sweep)."""
    calls = [str(path) for name, path in modules().items()
             if not name.startswith("launch") and "launch.cli" in path.read_text()]
    assert not calls, f"modules below launch that run the CLI: {calls}"


def test_the_layer_test_sees_a_violation(tmp_path, monkeypatch):
    """The checks above find an upward import and a cycle when there is one."""
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    for package in LAYERS:
        (tmp_path / package).mkdir()
    (tmp_path / "common" / "a.py").write_text("from pretrain import b\n")
    (tmp_path / "pretrain" / "b.py").write_text("def f():\n    from common.a import x\n")
    with pytest.raises(AssertionError, match="common/a.py:1 imports pretrain.b"):
        test_every_import_points_down_the_stack()
    with pytest.raises(AssertionError, match="common.a -> pretrain.b -> common.a"):
        test_no_module_imports_itself_back()
