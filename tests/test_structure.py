"""The library's shape: no import cycle, a public surface, run files named in one place."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import onpolicy_lib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "onpolicy_lib"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every import between the package's modules, module-level and inside functions alike."""
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "onpolicy_lib":
                    edges.add(target)
        graph[name] = edges
    return graph


def test_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_import_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "onpolicy_lib.data" in graph["onpolicy_lib.config"]  # a lazy import in TrainConfig.validate
    assert "onpolicy_lib.sweep" not in graph["onpolicy_lib.results"]


def test_public_surface_resolves():
    assert sorted(onpolicy_lib.__all__) == onpolicy_lib.__all__
    for name in onpolicy_lib.__all__:
        assert getattr(onpolicy_lib, name) is not None, name
    # `train` stays the function even once the module that defines it is imported.
    import importlib

    importlib.import_module("onpolicy_lib.training")
    assert callable(onpolicy_lib.train) and onpolicy_lib.train.__module__ == "onpolicy_lib.training"
    with pytest.raises(AttributeError):
        onpolicy_lib.no_such_name  # noqa: B018


def test_importing_the_package_and_validating_a_config_loads_no_torch():
    code = ("import sys, onpolicy_lib as opq; opq.TrainConfig(lmbda=1.0).run_name(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


RUN_FILES = ("config.json", "metrics.json", "eval.json", "eval_before.json", "train_log.jsonl", "quantization.json",
             "sweep.json", "sweep-error.txt", "sweep-log.txt", "eval_cache")


def test_run_file_names_are_spelled_only_in_rundir():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "rundir.py":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "a model's file" in line:  # e.g. a HF model directory's own config.json
                continue
            for name in RUN_FILES:
                if re.search(rf"[\"']{re.escape(name)}[\"']", code):
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {name}")
    assert not offenders, offenders


def test_no_issue_numbers_in_code():
    pattern = re.compile(r"\bissue\s*#?\d+|\(#\d+\)", re.IGNORECASE)
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py")]
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line) and p.name != __file__]
    assert not [h for h in hits if "test_structure.py" not in h], hits
