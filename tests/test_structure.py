"""Imports run one way: spec <- plan <- dataplane <- sni | k8s <- agent <- cli, with the
shared leaves (errors, defaults, memory) below everything, and no import circle anywhere,
counting the imports made inside functions too."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "operator"
PACKAGE = ROOT / "xdplb"

# Layer of each top-level part of the package; a module may import its own part and the
# layers below. sni and k8s share a layer and never import each other.
LAYERS = {"errors": 0, "defaults": 0, "memory": 0, "spec": 1, "plan": 2, "dataplane": 3,
          "sni": 4, "k8s": 4, "agent": 5, "cli": 6}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def imports(name: str, source: str, known: Iterable[str], package: bool = False) -> set[str]:
    """Every module of ``known`` that module ``name`` imports, wherever in its source."""
    known = set(known)
    parent = name if package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = parent.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            # `from xdplb.dataplane import layout` imports the module xdplb.dataplane.layout
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m not in (name, "xdplb")}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def upward(graph: Mapping[str, set[str]]) -> list[str]:
    """Imports of a higher layer's module, or of another part of the same layer."""
    return [f"{a} imports {b}" for a, deps in sorted(graph.items()) for b in sorted(deps)
            if part(a) and part(b) != part(a) and LAYERS[part(b)] >= LAYERS[part(a)]]


def circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                out.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


GRAPH = {name: imports(name, path.read_text(), MODULES, path.name == "__init__.py")
         for name, path in MODULES.items()}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_every_part_has_a_layer() -> None:
    assert {part(m) for m in MODULES} - {""} == set(LAYERS)


def test_no_import_runs_upward_or_sideways() -> None:
    assert upward(GRAPH) == []


def test_no_import_circle() -> None:
    assert circles(GRAPH) == []


def test_the_checks_catch_what_they_look_for() -> None:
    lazy = "def f() -> None:\n    from xdplb.k8s import crd\n    from . import model\n"
    known = {"xdplb.k8s", "xdplb.k8s.crd", "xdplb.spec.model", "xdplb.spec.x"}
    found = imports("xdplb.spec.x", lazy, known)
    assert found == {"xdplb.k8s", "xdplb.k8s.crd", "xdplb.spec.model"}
    assert upward({"xdplb.spec.x": found}) == ["xdplb.spec.x imports xdplb.k8s",
                                               "xdplb.spec.x imports xdplb.k8s.crd"]
    assert upward({"xdplb.sni.a": {"xdplb.k8s.b"}}) == ["xdplb.sni.a imports xdplb.k8s.b"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
