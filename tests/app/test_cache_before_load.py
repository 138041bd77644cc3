"""Embeddings and rerank ask the response cache before their tier loads: a repeated request is
answered from it without loading a model that was unloaded (by an admin or the idle timeout)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from tests.live import fake_app

ENV = {
    "EMBEDDING_MODEL_PATH": "fake/words",
    "RERANKER_MODEL_PATH": "fake/overlap",
    "ENABLE_CACHE": "true",
    "CACHE_PERSIST_TO_DISK": "false",
}


@pytest.fixture
def client() -> Iterator[TestClient]:  # type: ignore[type-arg]
    with fake_app(ENV) as http:
        yield http


@pytest.mark.parametrize(
    ("tier", "path", "body"),
    [
        ("embedding", "/v1/embeddings", {"model": "embedding", "input": ["red fox", "a cat"]}),
        ("reranker", "/v1/rerank", {"model": "reranker", "query": "red fox", "documents": ["a cat", "red fox"]}),
    ],
)
def test_a_cache_hit_does_not_load_an_unloaded_tier(
    client: TestClient,  # type: ignore[type-arg]
    tier: str,
    path: str,
    body: dict[str, Any],
) -> None:
    first = client.post(path, json=body)
    assert first.status_code == 200 and first.headers["X-Cache"] == "MISS"
    assert client.post(f"/v1/models/{tier}/unload").status_code == 200
    again = client.post(path, json=body)
    assert again.status_code == 200 and again.headers["X-Cache"] == "HIT"
    assert again.json()["usage"] == first.json()["usage"]
    assert client.get("/health").json()["tiers"][tier]["state"] == "available"  # still unloaded
    stats = client.get("/v1/stats").json()
    assert stats["tiers"][tier]["requests"]["total"] == 2  # both counted for the tier, hit included
    assert stats["tiers"][tier]["state"] == "available"
    # A miss loads it as before.
    changed = {**body, "model": tier, ("input" if tier == "embedding" else "query"): "something new"}
    miss = client.post(path, json=changed)
    assert miss.status_code == 200 and miss.headers["X-Cache"] == "MISS"
    assert client.get("/health").json()["tiers"][tier]["state"] == "loaded"
