"""The package's shape, checked: modules import in one direction (no cycles,
at module level or inside functions), source files stay small enough to
hold in one's head, and code and docs point only at files in this
repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pyccl"

pytestmark = pytest.mark.timeout(60)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """module -> pyccl modules it imports (anywhere in the file)."""
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                # A package's __init__ importing its own submodules is its job, not a cycle.
                if t and t != mod and not t.startswith(mod + ".") and t.startswith("pyccl"):
                    graph[mod].add(t)
    return graph


def test_no_import_cycles() -> None:
    graph = _imports()
    # Packages re-export their submodules: an edge into a package means its __init__.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("limit, where", [(600, "pyccl"), (600, "csrc")])
def test_source_files_stay_small(limit: int, where: str) -> None:
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted((ROOT / where).rglob("*"))
           if p.suffix in (".py", ".cpp", ".h") and (n := len(p.read_text().splitlines())) > limit]
    assert not big, big


def test_python_functions_stay_short() -> None:
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > 90:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, long


def test_nothing_points_outside_the_repository() -> None:
    bad = re.compile(r"\.\./shared|DESIGN\.md|TORCH_NOTES")
    hits = []
    for where in ("pyccl", "csrc", "bindings", "docs", "tests", "benchmarks", "examples"):
        for p in (ROOT / where).rglob("*"):
            if p.suffix in (".py", ".cpp", ".h", ".md", ".pyi") and p != Path(__file__).resolve():
                hits += [f"{p.relative_to(ROOT)}:{i}" for i, line in enumerate(p.read_text().splitlines(), 1)
                         if bad.search(line)]
    hits += [f"README.md:{i}" for i, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1)
             if bad.search(line)]
    assert not hits, hits
