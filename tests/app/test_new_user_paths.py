"""Issue 30, on the fake engines in-process: what a new user met with keys off (the default) on
admin routes, adapters on tiers that take none, retrieval options, and `/v1/config`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from tests.live import fake_app

pytest.importorskip("qdrant_client")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:  # type: ignore[type-arg]
    env = {
        "LIGHT_MODEL_PATH": "fake/echo",
        "EMBEDDING_MODEL_PATH": "fake/words",
        "RERANKER_MODEL_PATH": "fake/overlap",
        "RATE_LIMIT_PER_MINUTE": "3",
        "COLLECTIONS_DIR": str(tmp_path / "collections"),
        "BATCH_DIR": str(tmp_path / "batches"),
    }
    with fake_app(env) as http:
        yield http


def error(res: Any, status: int) -> dict[str, Any]:
    assert res.status_code == status, res.text
    return res.json()["error"]  # type: ignore[no-any-return]


def test_an_exhausted_rate_limit_does_not_lock_out_the_admin_route_that_lifts_it(
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    for _ in range(3):
        assert client.get("/v1/models").status_code == 200
    assert error(client.get("/v1/models"), 429)["code"] == "rate_limit_exceeded"
    # Keys are off: every request comes from one IP, but admin routes count in their own bucket.
    lifted = client.patch("/v1/config", json={"server": {"rate_limit_per_minute": 100}})
    assert lifted.status_code == 200, lifted.text
    assert client.get("/v1/models").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/embeddings", {"model": "embedding", "input": "hi", "adapter": "legal"}, "adapter"),
        ("/v1/embeddings", {"model": "embedding:legal", "input": "hi"}, "model"),
        ("/v1/rerank", {"model": "reranker", "query": "q", "documents": ["a"], "adapter": "legal"}, "adapter"),
        ("/v1/rerank", {"model": "reranker:legal", "query": "q", "documents": ["a"]}, "model"),
    ],
)
def test_an_adapter_on_a_tier_that_takes_none_is_refused(
    client: TestClient,  # type: ignore[type-arg]
    path: str,
    body: dict[str, Any],
    param: str,
) -> None:
    refused = error(client.post(path, json=body), 400)
    assert refused["param"] == param and "adapter" in refused["message"]


def _collection(client: TestClient) -> None:  # type: ignore[type-arg]
    client.patch("/v1/config", json={"server": {"rate_limit_per_minute": 1000}})
    assert client.post("/v1/collections", json={"name": "kb"}).status_code == 200
    docs = [{"id": f"d{i}", "text": f"note {i} about otters and rivers"} for i in range(4)]
    assert client.post("/v1/collections/kb/documents", json={"documents": docs}).status_code == 200


def test_a_misspelt_retrieval_option_is_a_400_naming_the_known_one(client: TestClient) -> None:  # type: ignore[type-arg]
    _collection(client)
    query = error(client.post("/v1/collections/kb/query", json={"query": "otters", "topk": 2}), 400)
    assert query["param"] == "topk" and "`top_k`" in query["message"]
    chat = {"model": "light", "messages": [{"role": "user", "content": "otters?"}], "rag": {"topk": 2}}
    rag = error(client.post("/v1/collections/kb/chat/completions", json=chat), 400)
    assert rag["param"] == "rag.topk" and "`rag.top_k`" in rag["message"]
    unknown = error(client.post("/v1/collections/kb/query", json={"query": "otters", "zzz": 1}), 400)
    assert unknown["param"] == "zzz" and "top_k" in unknown["message"]  # nothing close: the known ones listed
    # The known spelling works, and other clients' unknown chat fields are still accepted.
    chat["rag"] = {"top_k": 2}
    answer = client.post("/v1/collections/kb/chat/completions", json={**chat, "metadata_x": 1})
    assert answer.status_code == 200, answer.text
    assert [s["citation"] for s in answer.json()["sources"]] == [1, 2]


def test_sources_carry_the_citation_number_the_prompt_gives_them(client: TestClient) -> None:  # type: ignore[type-arg]
    _collection(client)
    found = client.post("/v1/collections/kb/query", json={"query": "otters", "top_k": 3}).json()
    assert [s["citation"] for s in found["data"]] == [1, 2, 3]
    assert found["reranked"] is True and found["rerank_skipped"] is None  # a reranker of its own runs
    chat = {"model": "light", "messages": [{"role": "user", "content": "otters?"}], "rag": {"top_k": 2}}
    answer = client.post("/v1/collections/kb/chat/completions", json=chat).json()
    assert [s["citation"] for s in answer["sources"]] == [1, 2] and answer["reranked"] is True


def test_config_shows_only_the_settings_that_apply_to_each_tier(client: TestClient) -> None:  # type: ignore[type-arg]
    tiers = client.get("/v1/config").json()["tiers"]
    assert {"temperature", "max_tokens", "adapters"} <= set(tiers["light"])
    assert not {"device", "normalize", "pooling"} & set(tiers["light"])
    assert {"normalize", "device"} <= set(tiers["embedding"])
    assert not {"temperature", "max_tokens", "adapters", "hybrid_weights"} & set(tiers["embedding"])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tiers": {"light": {"temperature": "0.3"}}}, "tiers.light.temperature"),
        ({"tiers": {"light": {"max_tokens": "256"}}}, "tiers.light.max_tokens"),
        ({"server": {"rate_limit_per_minute": "60"}}, "server.rate_limit_per_minute"),
    ],
)
def test_config_refuses_a_string_where_a_number_belongs(
    client: TestClient,  # type: ignore[type-arg]
    body: dict[str, Any],
    param: str,
) -> None:
    refused = error(client.patch("/v1/config", json=body), 400)
    assert refused["param"] == param and "number" in refused["message"]
    assert client.get("/v1/config").json()["tiers"]["light"]["temperature"] is None  # nothing changed: unset
