"""DESIGN §1: imports point down. Engines stand on the kernel, never on the web app."""

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


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_lower_layers_never_import_upward(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(_imports(path) - ALLOWED[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert not {k: v for k, v in wrong.items() if v}
