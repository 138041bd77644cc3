"""The response cache against the real Gemma: a real model's cached answer is its live answer
(and the model does not run again), and llama.cpp's prefix cache is counted and cleared. The rest
of the cache (keys, streams replayed, TTL, LRU, persistence, embeddings and rerank) is about the
app: tests/app/test_cache.py, on the fake engines."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.live import LiveServer, live_server

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


def content(res: httpx.Response) -> str:
    assert res.status_code == 200, res.text
    return str(res.json()["choices"][0]["message"]["content"])


def test_deterministic_request_hits_the_second_time(server: LiveServer, http: httpx.Client) -> None:
    worker = server.app.state.registry.slots["light"].worker
    first = http.post("/v1/chat/completions", json=CHAT)
    assert first.headers["X-Cache"] == "MISS"
    deadline = time.monotonic() + 10
    while worker.busy and time.monotonic() < deadline:  # the worker counts a job just after its last chunk
        time.sleep(0.01)
    processed = worker.processed
    second = http.post("/v1/chat/completions", json=CHAT)
    assert second.headers["X-Cache"] == "HIT"
    assert content(second) == content(first)
    usage = second.json()["usage"]
    assert usage["completion_tokens"] == first.json()["usage"]["completion_tokens"]
    assert (
        usage["prompt_tokens_details"]["cached_tokens"]
        == usage["prompt_tokens"]
        == first.json()["usage"]["prompt_tokens"]
    )
    assert second.json()["id"] != first.json()["id"]  # a fresh envelope around the cached result
    assert worker.processed == processed  # the model did not run
    stats = http.get("/v1/cache/stats").json()["response"]
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 1, 1) and stats["bytes"] > 0
    assert stats["hit_rate"] == 0.5


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
