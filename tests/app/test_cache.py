"""The response cache over HTTP on the fake engines: hits and misses, streams replayed, TTL,
LRU, persistence, clearing, embeddings and rerank. What needs a real model (llama.cpp's prefix
cache, a real model's cached answer) is in tests/api/test_cache_real_model.py."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from litestar.testing import TestClient

from backends.base import GenerationRequest
from embedders.fake import FakeEmbedder
from rerankers.fake import FakeReranker
from service.cache import FILE_NAME, ResponseCache
from service.testing import fake_engines
from service.tiers.families import EngineFactories
from tests.live import assert_second_answer_is_cached, fake_app, live_server, recording_backend

MSG = [{"role": "user", "content": "Tell me about cats."}]
CHAT = {"model": "light", "messages": MSG, "max_tokens": 12, "temperature": 0}
# `fake/<name>` needs no file; the name is what a real model's would be, for the ids below.
LIGHT = {"LIGHT_MODEL_PATH": "fake/gemma-3-270m"}


def env(**extra: str) -> dict[str, str]:
    return {**LIGHT, "ENABLE_CACHE": "true", **extra}


@pytest.fixture(scope="module")
def server() -> Iterator[TestClient]:  # type: ignore[type-arg]
    tiers = {"EMBEDDING_MODEL_PATH": "fake/words", "RERANKER_MODEL_PATH": "tier:embedding"}
    with fake_app(env(**tiers)) as client:
        yield client


@pytest.fixture
def http(server: TestClient) -> TestClient:  # type: ignore[type-arg]
    assert server.post("/v1/cache/clear", json={"target": "response"}).status_code == 200
    return server


def content(res: httpx.Response) -> str:
    assert res.status_code == 200, res.text
    return str(res.json()["choices"][0]["message"]["content"])


def stream_events(http: httpx.Client, body: dict[str, object]) -> tuple[httpx.Headers, list[dict[str, object]]]:
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as res:
        assert res.status_code == 200
        lines = [line.removeprefix("data: ") for line in res.iter_lines() if line.startswith("data: ")]
        headers = res.headers
    assert lines[-1] == "[DONE]"
    return headers, [json.loads(line) for line in lines[:-1]]


def test_deterministic_request_hits_the_second_time(http: TestClient) -> None:  # type: ignore[type-arg]
    worker = http.app.state.registry.slots["light"].worker
    assert_second_answer_is_cached(http, worker, CHAT)


def test_every_output_parameter_is_part_of_the_key(http: TestClient) -> None:  # type: ignore[type-arg]
    http.post("/v1/chat/completions", json=CHAT)
    for change in (
        {"max_tokens": 11},
        {"top_k": 5},
        {"stop": ["\n"]},
        {"repeat_penalty": 1.3},
        {"messages": [{"role": "user", "content": "Tell me about dogs."}]},
    ):
        assert http.post("/v1/chat/completions", json={**CHAT, **change}).headers["X-Cache"] == "MISS", change
    # The wire `model` name does not matter: the tier does.
    assert http.post("/v1/chat/completions", json={**CHAT, "model": "light/gemma-3-270m"}).headers["X-Cache"] == "HIT"
    # Chat and legacy completions are separate kinds even for the same tier.
    completion = {"model": "light", "prompt": "Cats", "max_tokens": 4, "temperature": 0}
    assert http.post("/v1/completions", json=completion).headers["X-Cache"] == "MISS"
    res = http.post("/v1/completions", json={**completion, "echo": True})
    assert res.headers["X-Cache"] == "HIT" and res.json()["choices"][0]["text"].startswith("Cats")


def test_only_deterministic_requests_are_cached(http: TestClient) -> None:  # type: ignore[type-arg]
    sampled = {**CHAT, "temperature": 0.8}
    for _ in range(2):
        assert "X-Cache" not in http.post("/v1/chat/completions", json=sampled).headers
    seeded = {**sampled, "seed": 42}
    assert http.post("/v1/chat/completions", json=seeded).headers["X-Cache"] == "MISS"
    assert http.post("/v1/chat/completions", json=seeded).headers["X-Cache"] == "HIT"
    assert http.get("/v1/cache/stats").json()["response"]["entries"] == 1


def test_random_seed_is_not_a_fixed_seed() -> None:
    """seed 2**32-1 is llama.cpp's "random seed" (LLAMA_DEFAULT_SEED): its answers are not cached,
    and the seeds of `n` choices, moving on from a fixed seed, never land on it."""
    seen: list[GenerationRequest] = []
    engines = EngineFactories(backend=recording_backend(seen), embedder=FakeEmbedder, reranker=FakeReranker)
    with fake_app(env(), engines) as http:
        random = {**CHAT, "temperature": 0.8, "seed": 2**32 - 1}
        for _ in range(2):
            assert "X-Cache" not in http.post("/v1/chat/completions", json=random).headers
        assert http.get("/v1/cache/stats").json()["response"]["entries"] == 0
        seen.clear()
        res = http.post("/v1/chat/completions", json={**random, "seed": 2**32 - 3, "n": 3})
        assert res.status_code == 200 and res.headers["X-Cache"] == "MISS"
        assert sorted(r.seed for r in seen if r.seed is not None) == [0, 2**32 - 3, 2**32 - 2]
        assert http.get("/v1/cache/stats").json()["response"]["entries"] == 3


def test_stream_replays_from_cache(http: TestClient) -> None:  # type: ignore[type-arg]
    body = {**CHAT, "stream_options": {"include_usage": True}}
    live_headers, live = stream_events(http, body)
    cached_headers, replay = stream_events(http, body)
    assert (live_headers["X-Cache"], cached_headers["X-Cache"]) == ("MISS", "HIT")
    assert cached_headers["content-type"].startswith("text/event-stream")

    def text(events: list[dict[str, object]]) -> str:
        return "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])  # type: ignore[attr-defined]

    assert text(replay) == text(live) and len(replay) == len(live)
    assert replay[0]["choices"][0]["delta"]["role"] == "assistant"  # type: ignore[index]
    usage, live_usage = replay[-1]["usage"], live[-1]["usage"]
    assert replay[-1]["choices"] == [] and isinstance(usage, dict) and isinstance(live_usage, dict)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        live_usage["prompt_tokens"],
        live_usage["completion_tokens"],
    )
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]  # nothing was computed
    # A non-streaming request is served from what the stream stored, and vice versa.
    res = http.post("/v1/chat/completions", json=CHAT)
    assert res.headers["X-Cache"] == "HIT" and content(res) == text(live)


def test_hit_needs_no_loaded_model(http: TestClient) -> None:  # type: ignore[type-arg]
    expected = content(http.post("/v1/chat/completions", json=CHAT))
    assert http.post("/v1/models/light/unload").status_code == 200
    res = http.post("/v1/chat/completions", json=CHAT)
    assert res.headers["X-Cache"] == "HIT" and content(res) == expected
    assert http.get("/health").json()["tiers"]["light"]["state"] == "available"
    assert http.post("/v1/models/light/load").status_code == 200


def test_clear_response_cache(http: TestClient) -> None:  # type: ignore[type-arg]
    http.post("/v1/chat/completions", json=CHAT)
    res = http.post("/v1/cache/clear", json={"target": "response"})
    assert res.status_code == 200 and res.json() == {"cleared": {"response": {"entries": 1}}}
    assert http.post("/v1/chat/completions", json=CHAT).headers["X-Cache"] == "MISS"
    bad = http.post("/v1/cache/clear", json={"target": "everything"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "target"


def test_embeddings_and_rerank_are_cached(http: TestClient) -> None:  # type: ignore[type-arg]
    batcher = http.app.state.registry.slots["embedding"].batcher
    body = {"model": "embedding", "input": ["cats purr", "dogs bark"]}
    first = http.post("/v1/embeddings", json=body)
    items = batcher.items
    second = http.post("/v1/embeddings", json=body)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert second.json() == first.json() and batcher.items == items  # the model did no work
    other = http.post("/v1/embeddings", json={**body, "dimensions": 8})
    assert other.headers["X-Cache"] == "MISS" and len(other.json()["data"][0]["embedding"]) == 8
    query = {"model": "reranker", "query": "cats", "documents": ["cats purr", "stocks fell"]}
    rerank = [http.post("/v1/rerank", json=query) for _ in range(2)]
    assert [r.headers["X-Cache"] for r in rerank] == ["MISS", "HIT"]
    assert rerank[1].json()["results"] == rerank[0].json()["results"]
    tei = [http.post("/rerank", json={"query": "cats", "texts": ["cats purr", "stocks fell"]}) for _ in range(2)]
    assert [r.headers["X-Cache"] for r in tei] == ["MISS", "HIT"] and tei[1].json() == tei[0].json()


def test_cache_off_by_default() -> None:
    with fake_app(LIGHT) as http:
        for _ in range(2):
            assert "X-Cache" not in http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2}).headers
        stats = http.get("/v1/cache/stats").json()["response"]
        assert stats["enabled"] is False and stats["entries"] == 0 and stats["hits"] == 0


def test_ttl_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    # The cache's clock, moved on by the test: nothing waits for a real second to pass.
    now = [time.time()]
    monkeypatch.setattr(
        ResponseCache, "__init__", functools.partialmethod(ResponseCache.__init__, clock=lambda: now[0])
    )
    with fake_app(env(CACHE_TTL_SECONDS="1")) as http:
        body = {**CHAT, "max_tokens": 2}
        assert http.post("/v1/chat/completions", json=body).headers["X-Cache"] == "MISS"
        assert http.post("/v1/chat/completions", json=body).headers["X-Cache"] == "HIT"
        now[0] += 1.2
        assert http.post("/v1/chat/completions", json=body).headers["X-Cache"] == "MISS"
        assert http.get("/v1/cache/stats").json()["response"]["expirations"] == 1


def test_lru_size_limit() -> None:
    with fake_app(env(CACHE_MAX_SIZE="2")) as http:
        bodies = [{**CHAT, "max_tokens": n} for n in (1, 2, 3)]
        for body in bodies:
            http.post("/v1/chat/completions", json=body)
        stats = http.get("/v1/cache/stats").json()["response"]
        assert stats["entries"] == 2 and stats["evictions"] == 1
        assert http.post("/v1/chat/completions", json=bodies[0]).headers["X-Cache"] == "MISS"
        assert http.post("/v1/chat/completions", json=bodies[2]).headers["X-Cache"] == "HIT"


def test_persisted_across_restart(tmp_path: Path) -> None:
    persisted = env(CACHE_PERSIST_TO_DISK="true", CACHE_DIR=str(tmp_path / "cache"))
    with fake_app(persisted) as http:
        first = http.post("/v1/chat/completions", json=CHAT)
        assert first.headers["X-Cache"] == "MISS"
    assert (tmp_path / "cache" / FILE_NAME).is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [FILE_NAME]  # no temp file left
    # A real server (fake_app waits for every tier to load; this one must not load at all).
    with (
        live_server({**persisted, "LIGHT_PRELOAD": "false"}, engines=fake_engines()) as server,
        server.client() as http,
    ):
        again = http.post("/v1/chat/completions", json=CHAT)
        assert again.headers["X-Cache"] == "HIT" and content(again) == content(first)
        assert http.get("/health").json()["tiers"]["light"]["state"] == "available"  # served without the model


@pytest.mark.parametrize("content_", [b"\x93\x01garbage\xc1", b'{"format": "not ours"}'], ids=["corrupt", "foreign"])
def test_corrupt_cache_file_is_ignored(tmp_path: Path, content_: bytes) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / FILE_NAME).write_bytes(content_)
    persisted = env(CACHE_PERSIST_TO_DISK="true", CACHE_DIR=str(folder))
    with fake_app(persisted) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/v1/cache/stats").json()["response"]["entries"] == 0
        assert http.post("/v1/chat/completions", json=CHAT).headers["X-Cache"] == "MISS"
    with fake_app(persisted) as http:
        assert http.post("/v1/chat/completions", json=CHAT).headers["X-Cache"] == "HIT"  # a valid file replaced it
