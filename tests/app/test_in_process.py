"""The app in-process on the fake engines (service.testing): auth, the error envelope, the
response cache, lifecycle and metrics, where the test is about the server, not a model. Real
clients (openai's SDK over Litestar's TestClient); the engine contract suites run real models."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from litestar.testing import TestClient

from tests.live import fake_app

ENV = {
    "LIGHT_MODEL_PATH": "fake/echo",
    "EMBEDDING_MODEL_PATH": "fake/words",
    "RERANKER_MODEL_PATH": "fake/overlap",
    "ENABLE_CACHE": "true",
    "CACHE_PERSIST_TO_DISK": "false",
}
KEY, ADMIN = "sk-user-test", "sk-admin-test"


@pytest.fixture
def client() -> Iterator[TestClient]:  # type: ignore[type-arg]
    env = {**ENV, "API_KEYS": KEY, "ADMIN_API_KEYS": ADMIN}
    with fake_app(env, headers={"Authorization": f"Bearer {KEY}"}) as http:
        yield http


def sdk(http: TestClient, key: str = KEY) -> openai.OpenAI:  # type: ignore[type-arg]
    return openai.OpenAI(base_url=f"{http.base_url}/v1", api_key=key, http_client=http, max_retries=0)


def test_chat_streams_and_answers_through_the_sdk(client: TestClient) -> None:  # type: ignore[type-arg]
    answer = sdk(client).chat.completions.create(
        model="light", messages=[{"role": "user", "content": "héllo there"}], temperature=0
    )
    assert answer.choices[0].message.content == "héllo there"
    assert answer.usage is not None and answer.usage.completion_tokens == len("héllo there".encode())
    pieces = sdk(client).chat.completions.create(
        model="light", messages=[{"role": "user", "content": "two words"}], max_tokens=3, stream=True
    )
    chunks = list(pieces)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "two"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_keys_are_required_and_admin_routes_need_an_admin_key(client: TestClient) -> None:  # type: ignore[type-arg]
    with pytest.raises(openai.AuthenticationError) as denied:
        sdk(client, key="sk-wrong").models.list()
    assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
    assert client.post("/v1/models/light/unload").status_code == 403
    assert client.get("/health", headers={"Authorization": ""}).status_code == 200  # public


def test_errors_come_in_the_openai_envelope(client: TestClient) -> None:  # type: ignore[type-arg]
    res = client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert res.status_code == 404 and res.json()["error"]["code"] == "model_not_found"
    res = client.post("/v1/embeddings", json={"model": "light", "input": "x"})
    assert res.status_code == 400 and res.json()["error"]["param"] == "model"
    res = client.post("/v1/chat/completions", json={"model": "light", "messages": "not a list"})
    assert res.status_code == 400 and res.json()["error"]["type"] == "invalid_request_error"
    res = client.post("/v1/chat/completions", json={"model": "medium", "messages": [{"role": "user", "content": "x"}]})
    assert res.status_code == 404 and "medium" in res.json()["error"]["message"]


def test_a_repeated_deterministic_request_is_answered_from_the_cache(client: TestClient) -> None:  # type: ignore[type-arg]
    body = {"model": "light", "messages": [{"role": "user", "content": "cache me"}], "temperature": 0}
    first = client.post("/v1/chat/completions", json=body).json()
    second = client.post("/v1/chat/completions", json=body).json()
    assert first["choices"][0]["message"] == second["choices"][0]["message"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == second["usage"]["prompt_tokens"]
    embed = {"model": "embedding", "input": ["a b", "c"]}
    assert client.post("/v1/embeddings", json=embed).json() == client.post("/v1/embeddings", json=embed).json()
    by_kind = client.get("/v1/cache/stats").json()["response"]["by_kind"]
    assert by_kind["chat"] == {"hits": 1, "misses": 1} and by_kind["embeddings"] == {"hits": 1, "misses": 1}


def test_unload_then_the_next_request_loads_again(client: TestClient) -> None:  # type: ignore[type-arg]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    chat = {"model": "light", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert client.post("/v1/models/light/unload", headers=admin).status_code == 200
    assert client.get("/health").json()["tiers"]["light"]["state"] == "available"
    assert client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"] == "hi"
    card = client.get("/v1/models/light").json()
    assert (card["status"], card["engine"], card["usage_count"]) == ("loaded", "fake", 2)


def test_every_status_view_shows_the_same_tiers(client: TestClient) -> None:  # type: ignore[type-arg]
    assert client.post("/v1/embeddings", json={"model": "embedding", "input": ["one", "two"]}).status_code == 200
    rerank = {"model": "reranker", "query": "red fox", "documents": ["a cat", "red fox"]}
    ranked = client.post("/v1/rerank", json=rerank)
    assert [r["index"] for r in ranked.json()["results"]] == [1, 0]
    health = client.get("/health").json()["tiers"]
    models = {m["tier"]: m for m in client.get("/v1/models").json()["data"]}
    stats = client.get("/v1/stats").json()
    metrics = client.get("/metrics").text
    assert set(health) == set(models) == set(stats["tiers"]) == {"light", "embedding", "reranker"}
    for tier in health:
        assert health[tier]["model"] == models[tier]["id"] == stats["tiers"][tier]["model"]
        assert health[tier]["state"] == models[tier]["status"] == stats["tiers"][tier]["state"]
        assert f'llmservice_model_state{{state="{health[tier]["state"]}",tier="{tier}"}} 1.0' in metrics
    assert stats["tiers"]["embedding"]["worker"]["batches"] >= 1
    assert 'llmservice_worker_processed_total{tier="embedding"}' in metrics
