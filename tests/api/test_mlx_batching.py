"""Continuous batching on MLX through HTTP: concurrent requests share mlx-lm's BatchGenerator.

References come from the same tiny model run one request at a time in-process (`Backend.stream`,
the unbatched path): a batched request must give the same greedy text, finish reason and token
counts. The worker is held with a maintenance call while requests queue up, so which requests
share the batch is decided by the test, not by timing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlx_lm")

from backends.base import GenerationRequest, ResponseFormat
from backends.mlx.backend import MlxBackend
from kernel.config import TierSettings
from tests.app.test_prompt_cache_stats import metric
from tests.batching import Result, body_of, held, run_concurrently, stream, three_streams_one_cut, wait_until, worker_of
from tests.live import LiveServer, live_server

N_CTX = 2048
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "enum": [1, 2, 3]}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def env(model: Path, **extra: str) -> dict[str, str]:
    return {
        "LIGHT_MODEL_PATH": str(model),
        "LIGHT_BACKEND": "mlx",
        "LIGHT_N_CTX": str(N_CTX),
        "LIGHT_TEMPERATURE": "0",
        "LIGHT_REPEAT_PENALTY": "1.0",
        **extra,
    }


@pytest.fixture(scope="module")
def server(tiny_mlx_model: Path) -> Iterator[LiveServer]:
    with live_server(env(tiny_mlx_model, LIGHT_MAX_BATCH="4"), wait_for=("light",)) as live:
        yield live


@pytest.fixture(scope="module")
def unbatched(tiny_mlx_model: Path) -> Iterator[MlxBackend]:
    tier = TierSettings(name="light", n_ctx=N_CTX, prefix_cache_entries=0)
    backend = MlxBackend(tier, str(tiny_mlx_model))
    backend.load()
    yield backend
    backend.close()


def reference(backend: MlxBackend, case: dict[str, Any]) -> Result:
    body = body_of(case)
    fmt = ResponseFormat("json_schema", case["schema"]) if "schema" in case else None
    request = GenerationRequest(
        prompt=body.get("prompt", ""),
        messages=tuple(body["messages"]) if "messages" in body else None,
        max_tokens=body["max_tokens"],
        temperature=body["temperature"],
        top_p=body["top_p"],
        top_k=body["top_k"],
        repeat_penalty=body.get("repeat_penalty", 1.0),
        seed=body.get("seed"),
        stop=tuple(body.get("stop", ())),
        response_format=fmt,
    )
    chunks = list(backend.stream(request))
    usage = chunks[-1].usage
    assert usage is not None
    text = "".join(c.text for c in chunks)
    return Result(text, chunks[-1].finish_reason, usage.prompt_tokens, usage.completion_tokens)


def test_concurrent_requests_match_one_at_a_time(server: LiveServer, unbatched: MlxBackend) -> None:
    plain = {"prompt": "Paris is the capital of France and", "max_tokens": 30}
    full = reference(unbatched, plain).text
    assert len(full) > 12
    cases: list[dict[str, Any]] = [
        {"prompt": "Once upon a time", "max_tokens": 6},
        {"prompt": "The weather today is sunny with a light wind; " * 6, "max_tokens": 40},
        {**plain, "stop": [full[8:11]]},
        {"prompt": "Numbers: 0 1 2", "max_tokens": 48, "repeat_penalty": 1.4},
        {"prompt": "She read a book about", "max_tokens": 24, "temperature": 1.0, "seed": 11},
        {"messages": [{"role": "user", "content": "Give me JSON."}], "max_tokens": 60, "schema": SCHEMA},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 20},
    ]
    expected = [reference(unbatched, c) for c in cases]
    # Seven requests, four slots: the short ones finish and queued ones join a running batch.
    got = run_concurrently(server, cases)
    assert got == expected
    assert got[2].finish_reason == "stop" and full[8:11] not in got[2].text
    assert json.loads(got[5].text)["n"] in (1, 2, 3)
    worker = worker_of(server)
    wait_until(lambda: worker.running == 0)
    assert worker.in_flight == 0 and not worker.busy


def test_batched_follow_up_reuses_the_prefix_cache(server: LiveServer) -> None:
    history = [
        {"role": "system", "content": "Answer about the weather in the city. " * 6},
        {"role": "user", "content": "Will it rain tomorrow?"},
    ]
    first = run_concurrently(server, [{"messages": history, "max_tokens": 4}, {"prompt": "Hi", "max_tokens": 4}])[0]
    follow = [*history, {"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    with server.client() as http:
        res = http.post("/v1/chat/completions", json={"model": "light", "messages": follow, "max_tokens": 2})
    usage = res.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= first.prompt_tokens
    assert usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


def test_conversations_past_the_prefix_cache_return_from_the_prompt_cache(server: LiveServer) -> None:
    # Six conversations through the four the prefix cache keeps live: two go to the RAM tier (the
    # default PROMPT_CACHE_RAM_BYTES), and every next turn starts from its conversation's state.
    first = [
        [{"role": "user", "content": f"Conversation {i}: a long story about the number {i}. " * 4}] for i in range(6)
    ]
    with server.client() as http:
        assert http.post("/v1/cache/clear", json={"target": "prefix"}).status_code == 200
        replies = [stream(http, {"messages": messages, "max_tokens": 4}) for messages in first]
        held = http.get("/v1/cache/stats").json()["prompt"]["light"]
        assert held["ram"]["entries"] == 2 and held["ram"]["bytes"] > 0
        for messages, reply in zip(first, replies, strict=True):
            follow = [*messages, {"role": "assistant", "content": reply.text}, {"role": "user", "content": "Go on."}]
            res = http.post("/v1/chat/completions", json={"model": "light", "messages": follow, "max_tokens": 2})
            assert res.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= reply.prompt_tokens
        held = http.get("/v1/cache/stats").json()["prompt"]["light"]
        assert held["ram"]["hits"] >= 2
        assert metric(http.get("/metrics").text, "llmservice_cache_hits_total", cache="prompt_ram", kind="light") >= 2
        http.post("/v1/cache/clear", json={"target": "prefix"})
        held = http.get("/v1/cache/stats").json()["prompt"]["light"]
        assert held["ram"]["entries"] == held["ram"]["bytes"] == 0


def test_disconnecting_one_stream_leaves_the_others_intact(server: LiveServer, unbatched: MlxBackend) -> None:
    cases: list[dict[str, Any]] = [
        {"prompt": f"Round {i}. The quick brown fox jumps over the lazy dog", "max_tokens": 150} for i in range(3)
    ]
    expected = [reference(unbatched, c) for c in cases]
    results = three_streams_one_cut(server, cases)
    worker = worker_of(server)
    assert results[0] == expected[0] and results[2] == expected[2]
    assert expected[1].text.startswith(results[1].text) and results[1].finish_reason is None
    wait_until(lambda: worker.running == 0)
    with server.client() as http:
        assert stream(http, cases[1]) == expected[1]


def test_queue_bound_still_answers_429(tiny_mlx_model: Path) -> None:
    settings = env(tiny_mlx_model, LIGHT_MAX_BATCH="2", LIGHT_MAX_QUEUE="2")
    statuses: list[int] = []

    with live_server(settings, wait_for=("light",)) as live:

        def queued() -> None:
            with live.client() as http:
                body = {"model": "light", "prompt": "Hi", "max_tokens": 4}
                statuses.append(http.post("/v1/completions", json=body).status_code)

        threads = [threading.Thread(target=queued) for _ in range(2)]
        with held(live) as worker, live.client() as http:
            for t in threads:
                t.start()
            wait_until(lambda: worker.waiting == 2)
            rejected = http.post("/v1/completions", json={"model": "light", "prompt": "x", "max_tokens": 2})
            assert rejected.status_code == 429 and int(rejected.headers["Retry-After"]) >= 1
            assert rejected.json()["error"]["code"] == "queue_full"
        for t in threads:
            t.join(60)
        assert statuses == [200, 200]
        wait_until(lambda: worker.in_flight == 0)
