"""The response cache against the real Gemma: a real model's cached answer is its live answer
(and the model does not run again), and llama.cpp's prefix cache is counted and cleared. The rest
of the cache (keys, streams replayed, TTL, LRU, persistence, embeddings and rerank) is about the
app: tests/app/test_cache.py, on the fake engines."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.live import LiveServer, assert_second_answer_is_cached, live_server

MSG = [{"role": "user", "content": "Tell me about cats."}]
CHAT = {"model": "light", "messages": MSG, "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def server(gemma_gguf: str) -> Iterator[LiveServer]:
    env = {"LIGHT_MODEL_PATH": gemma_gguf, "LIGHT_N_CTX": "512", "ENABLE_CACHE": "true"}
    with live_server(env, wait_for=("light",)) as live:
        yield live


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        assert client.post("/v1/cache/clear", json={"target": "response"}).status_code == 200
        yield client


def test_deterministic_request_hits_the_second_time(server: LiveServer, http: httpx.Client) -> None:
    worker = server.app.state.registry.slots["light"].worker
    assert_second_answer_is_cached(http, worker, CHAT)


def test_clear_prefix_cache(http: httpx.Client) -> None:
    body = {"model": "light", "prompt": "The history of the city of Rome began", "max_tokens": 2, "temperature": 0.9}

    def cached_tokens() -> int:
        res = http.post("/v1/completions", json=body)
        assert res.status_code == 200 and "X-Cache" not in res.headers
        return int(res.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    cached_tokens()
    assert cached_tokens() > 0  # llama.cpp reused the prompt from its KV cache
    before = http.get("/v1/cache/stats").json()["prefix"]
    assert before["hits"] >= 1 and before["reused_tokens"] > 0 and before["entries"] == 1
    res = http.post("/v1/cache/clear", json={"target": "prefix"})
    assert res.json() == {"cleared": {"prefix": {"tiers": ["light"]}}}
    assert cached_tokens() == 0
    after = http.get("/v1/cache/stats").json()["prefix"]
    assert after["misses"] == before["misses"] + 1
