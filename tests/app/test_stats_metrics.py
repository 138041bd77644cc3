"""`/v1/stats` and `/metrics` report exactly the traffic they saw, on the fake engines: the numbers
are the app's, whichever engine made the tokens. A real socket (`live_server`), for the stats read
while a stream runs."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.testing import counting, fake_engines
from tests.live import LiveServer, live_server

CHAT = {"model": "light", "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 6, "temperature": 0}
STREAM = {"model": "light", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0.5, "stream": True,
          "stream_options": {"include_usage": True}}  # fmt: skip


def samples(http: httpx.Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    res = http.get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(res.text)
        for s in family.samples
    }


def value(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A file for the fake model: its size is what the stats report as the model's memory."""
    path = tmp_path_factory.mktemp("model") / "gemma-3-270m.gguf"
    path.write_bytes(b"fake weights" * 100)
    return str(path)


@pytest.fixture(scope="module")
def traffic(model_file: str) -> Iterator[tuple[LiveServer, dict[str, int]]]:
    """A fresh server and a known mix of requests: what the tests below must find in the numbers."""
    env = {"LIGHT_MODEL_PATH": model_file, "LIGHT_N_CTX": "512", "ENABLE_CACHE": "true"}
    # Counting, a few ms a token: a long stream is still running while the stats are read.
    engines = fake_engines(reply=counting, token_seconds=0.003)
    with live_server(env, wait_for=("light",), engines=engines) as server, server.client() as http:
        tokens = {"completion": 0, "prompt": 0}
        miss = http.post("/v1/chat/completions", json=CHAT)
        assert miss.headers["X-Cache"] == "MISS"
        hit = http.post("/v1/chat/completions", json=CHAT)
        assert hit.headers["X-Cache"] == "HIT"
        with http.stream("POST", "/v1/completions", json=STREAM) as res:
            events = [line for line in res.iter_lines() if line.startswith("data: {")]
        stream_usage = httpx.Response(200, content=events[-1].removeprefix("data: ")).json()["usage"]
        for usage in (miss.json()["usage"], stream_usage):  # the hit generated nothing
            tokens["completion"] += usage["completion_tokens"]
            tokens["prompt"] += usage["prompt_tokens"]
        assert http.post("/v1/chat/completions", json={**CHAT, "temperature": 5}).status_code == 400
        assert http.post("/v1/chat/completions", json={**CHAT, "model": "nope"}).status_code == 404
        worker = server.app.state.registry.slots["light"].worker
        deadline = time.monotonic() + 10
        while worker.busy and time.monotonic() < deadline:  # it counts a job just after the last chunk
            time.sleep(0.01)
        # Monitoring is not traffic: none of these count.
        http.get("/health")
        http.get("/metrics")
        http.get("/v1/stats")
        yield server, tokens


def test_stats_after_known_traffic(traffic: tuple[LiveServer, dict[str, int]], model_file: str) -> None:
    server, tokens = traffic
    with server.client() as http:
        stats = http.get("/v1/stats").json()
    assert stats["requests"] == {"total": 5, "succeeded": 3, "failed": 2, "active": 0, "queued": 0}
    assert stats["uptime_seconds"] > 0 and stats["window_seconds"] == 60
    assert stats["latency_ms"]["count"] == 5 and 0 < stats["latency_ms"]["p50"] <= stats["latency_ms"]["p99"]
    assert stats["ttft_ms"]["count"] == 2  # the miss and the stream; the cache hit generated nothing
    assert stats["requests_per_second"] > 0 and stats["tokens_per_second"] > 0
    light = stats["tiers"]["light"]
    assert light["requests"] == {"total": 3, "succeeded": 3, "failed": 0}  # 400/404 never reached the tier
    assert light["state"] == "loaded" and light["usage_count"] == 2 and light["in_flight"] == 0
    assert light["memory_bytes"] == os.path.getsize(model_file)
    worker = light["worker"]
    assert worker["state"] == "idle" and worker["processed"] == 2 and 0 < worker["utilisation"] <= 1
    assert stats["workers"] == [{"tier": "light", **worker}]
    assert stats["memory"]["models_bytes"] == os.path.getsize(model_file)
    assert stats["memory"]["process_rss_bytes"] > stats["memory"]["models_bytes"] / 10
    window = stats["window_seconds"]
    expected = tokens["completion"] / max(1.0, min(window, stats["uptime_seconds"]))
    assert stats["tokens_per_second"] == pytest.approx(expected, rel=0.2)


def test_metrics_after_known_traffic(traffic: tuple[LiveServer, dict[str, int]]) -> None:
    server, tokens = traffic
    with server.client() as http:
        m = samples(http)
    chat, completions = "/v1/chat/completions", "/v1/completions"
    total = "llmservice_requests_total"
    assert value(m, total, route=chat, method="POST", tier="light", status="200") == 2
    assert value(m, total, route=completions, method="POST", tier="light", status="200") == 1
    assert value(m, total, route=chat, method="POST", tier="none", status="400") == 1
    assert value(m, total, route=chat, method="POST", tier="none", status="404") == 1
    assert not any(name == total and ("route", "/metrics") in labels for name, labels in m)
    assert not any(name == total and ("route", "/health") in labels for name, labels in m)
    assert value(m, "llmservice_request_duration_seconds_count", route=chat, tier="light") == 2
    assert value(m, "llmservice_time_to_first_token_seconds_count", tier="light") == 2
    assert value(m, "llmservice_completion_tokens_total", tier="light") == tokens["completion"]
    assert value(m, "llmservice_prompt_tokens_total", tier="light") == tokens["prompt"]
    assert value(m, "llmservice_cache_hits_total", cache="response", kind="chat") == 1
    assert value(m, "llmservice_cache_misses_total", cache="response", kind="chat") == 1
    assert value(m, "llmservice_response_cache_entries") == 1
    assert value(m, "llmservice_queue_depth", tier="light") == 0
    assert value(m, "llmservice_worker_busy", tier="light") == 0
    assert value(m, "llmservice_worker_processed_total", tier="light") == 2
    assert value(m, "llmservice_model_state", tier="light", state="loaded") == 1
    assert value(m, "llmservice_model_load_seconds", tier="light") > 0
    assert value(m, "llmservice_requests_active") == 0


def test_busy_worker_and_queue_while_streaming(traffic: tuple[LiveServer, dict[str, int]]) -> None:
    server, _ = traffic
    body = {"model": "light", "prompt": "Count: 1, 2, 3,", "max_tokens": 300, "temperature": 0.5, "stream": True}
    with server.client() as http, http.stream("POST", "/v1/completions", json=body) as res:
        lines = res.iter_lines()
        next(lines)  # generating now
        stats = http.get("/v1/stats").json()
        m = samples(http)
        list(lines)
    assert stats["requests"]["active"] == 1 and stats["tiers"]["light"]["worker"]["state"] == "busy"
    assert stats["tiers"]["light"]["in_flight"] == 1
    assert value(m, "llmservice_worker_busy", tier="light") == 1
    assert value(m, "llmservice_requests_active") == 1
    with server.client() as http:
        deadline = time.monotonic() + 10
        while http.get("/v1/stats").json()["requests"]["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.get("/v1/stats").json()["requests"]["active"] == 0


def test_each_app_has_its_own_metrics() -> None:
    env = {"LIGHT_MODEL_PATH": "fake/light", "LIGHT_N_CTX": "256", "LIGHT_PRELOAD": "false"}
    engines = fake_engines()
    with (
        live_server(env, engines=engines) as one,
        live_server(env, engines=engines) as two,
        one.client() as a,
        two.client() as b,
    ):
        assert a.get("/v1/models").status_code == 200
        assert (
            value(samples(a), "llmservice_requests_total", route="/v1/models", method="GET", tier="none", status="200")
            == 1
        )
        assert (
            value(samples(b), "llmservice_requests_total", route="/v1/models", method="GET", tier="none", status="200")
            == 0
        )
        assert value(samples(b), "llmservice_model_state", tier="light", state="available") == 1
