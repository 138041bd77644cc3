"""docs/design.md §1: imports point down, and no two modules import each other (even to type)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# package -> the packages of ours it may import
ALLOWED = {
    "kernel": {"kernel"},
    "backends": {"kernel", "backends"},
    "embedders": {"kernel", "embedders"},
    "rerankers": {"kernel", "rerankers", "embedders"},  # the embedding reranker scores with an embedder
    "stores": {"kernel", "stores"},
}
OURS = {"kernel", "service", "backends", "embedders", "rerankers", "stores"}
# Inside the app: a folder -> the app modules it may not import (tiers < serving < jobs < HTTP).
HTTP = {"service.app", "service.controllers", "service.openapi"}
BELOW = {
    "service.schemas": {"service.tiers", "service.serving", "service.jobs", *HTTP},
    "service.tiers": {"service.serving", "service.jobs", "service.metrics", "service.security", *HTTP},
    "service.serving": {"service.jobs", *HTTP},
    "service.jobs": HTTP,
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of ours that `path` imports, at any depth (functions, `if TYPE_CHECKING:`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from service.tiers import routing` imports a module, not a name
            found |= {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")}
    return {name for name in found if name.split(".")[0] in OURS}


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


SOURCES = {_module(p): p for pkg in OURS for p in sorted((ROOT / pkg).rglob("*.py"))}
GRAPH = {name: {m for m in _imports(path) if m in SOURCES and m != name} for name, path in SOURCES.items()}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_lower_layers_never_import_upward(package: str) -> None:
    wrong = {
        name: sorted({m.split(".")[0] for m in deps} - ALLOWED[package])
        for name, deps in GRAPH.items()
        if name.split(".")[0] == package
    }
    assert not {k: v for k, v in wrong.items() if v}


@pytest.mark.parametrize("folder", sorted(BELOW))
def test_app_folders_never_import_upward(folder: str) -> None:
    wrong = {
        name: sorted(m for m in deps if any(m == up or m.startswith(up + ".") for up in BELOW[folder]))
        for name, deps in GRAPH.items()
        if name == folder or name.startswith(folder + ".")
    }
    assert not {k: v for k, v in wrong.items() if v}


def test_no_import_circles() -> None:
    """Tarjan's strongly connected components over the module graph: every one has one module.
    (A package's `__init__` is not an edge to its modules: importing `a.b` runs `a`'s first.)"""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for dep in GRAPH[name]:
            if dep not in index:
                visit(dep)
                low[name] = min(low[name], low[dep])
            elif dep in stack:
                low[name] = min(low[name], index[dep])
        if low[name] == index[name]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == name:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    assert not circles
