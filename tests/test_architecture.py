"""The package's shape: no import cycle between modules or between subpackages.

Every import counts, including lazy ones inside functions and ``TYPE_CHECKING`` blocks: a
cycle hidden behind a lazy import is still two modules that cannot be understood (or
replaced) one without the other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "trio_spirecsi"
PACKAGE = "trio_spirecsi"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        if "_proto" in path.relative_to(ROOT).parts:
            continue
        found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                drop = node.level - 1 if is_package else node.level
                base = base[: len(base) - drop]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        for target in targets:
            # The longest known module the import names (a name imported from a module
            # counts as that module).
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith(PACKAGE + "."):
                yield target


def _graph(by_package: bool) -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)

    def node(module: str) -> str:
        if not by_package:
            return module
        parts = module.split(".")
        return ".".join(parts[:2])

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        if name == PACKAGE:
            continue
        edges = graph.setdefault(node(name), set())
        for target in _imports(name, path, known):
            if node(target) != node(name) and target != PACKAGE:
                edges.add(node(target))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("by_package", [False, True], ids=["modules", "subpackages"])
def test_no_import_cycles(by_package: bool) -> None:
    assert _cycles(_graph(by_package)) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lazy_and_type_checking_imports_count(tmp_path: Path) -> None:
    module = tmp_path / "volume.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from .registry import Agent\n"
        "def run() -> None:\n"
        "    from ..workloadapi import serve\n"
    )
    known = {
        "trio_spirecsi.volumes.registry",
        "trio_spirecsi.workloadapi",
        "trio_spirecsi.volumes.volume",
    }
    found = set(_imports("trio_spirecsi.volumes.volume", module, known))
    assert found == {"trio_spirecsi.volumes.registry", "trio_spirecsi.workloadapi"}
