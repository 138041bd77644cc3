"""No single request can hold a tier or lose a model (issue 12, points 2 and 4), where the work
bounded is a real engine's: a real tokenizer's time on a 5 MB prompt (a byte tokenizer takes none),
MiniLM's on a 5 MB input, and a broken GGUF that llama.cpp refuses to load. The bounds the app
applies before any engine (schemas, malformed bodies) run on the fake engines in
tests/app/test_request_bounds.py."""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live import LiveServer, live_server

MSG = [{"role": "user", "content": "Hi"}]
FIVE_MB = "lorem ipsum dolor sit amet " * (5 * 2**20 // 27)


def peak_rss_mib() -> float:
    """This process's peak resident memory: the live server runs in a thread of it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def server(gemma_gguf: str, minilm_path: str) -> Iterator[LiveServer]:
    env = {"LIGHT_MODEL_PATH": gemma_gguf, "LIGHT_N_CTX": "256", "EMBEDDING_MODEL_PATH": minilm_path,
           "RERANKER_MODEL_PATH": "tier:embedding"}  # fmt: skip
    with live_server(env, wait_for=("light", "embedding", "reranker")) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def test_a_huge_prompt_is_refused_before_tokenising(http: httpx.Client) -> None:
    started = time.monotonic()
    res = http.post("/v1/chat/completions", json={"model": "light", "messages": [{"role": "user", "content": FIVE_MB}]})
    elapsed = time.monotonic() - started
    assert res.status_code == 400 and res.json()["error"]["code"] == "context_length_exceeded"
    assert "256 tokens" in res.json()["error"]["message"]
    print(f"5 MB chat prompt refused in {elapsed:.2f} s")
    assert elapsed < 1.5
    res = http.post("/v1/completions", json={"model": "light", "prompt": list(range(1, 300))})
    assert res.status_code == 400 and res.json()["error"]["code"] == "context_length_exceeded"


def small_request(http: httpx.Client) -> float:
    started = time.monotonic()
    assert http.post("/v1/embeddings", json={"model": "embedding", "input": "a small one"}).status_code == 200
    return time.monotonic() - started


@pytest.mark.parametrize("path", ["/v1/rerank", "/v1/embeddings"])
def test_a_huge_input_does_not_hold_the_tier(http: httpx.Client, server: LiveServer, path: str) -> None:
    baseline = min(small_request(http) for _ in range(3))  # alone, on this (shared, noisy) machine
    before = peak_rss_mib()
    if path == "/v1/rerank":
        big = {"model": "reranker", "query": "lorem", "documents": [FIVE_MB, "short"]}
    else:
        big = {"model": "embedding", "input": [FIVE_MB]}
    result: dict[str, object] = {}

    def send_big() -> None:
        started = time.monotonic()
        with server.client() as other:
            result["response"] = other.post(path, json=big)
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=send_big)
    thread.start()
    time.sleep(0.3)  # the big one is uploaded and being served
    small = [small_request(http) for _ in range(3)]
    thread.join(60)
    res = result["response"]
    assert isinstance(res, httpx.Response) and res.status_code == 200, res
    grown = peak_rss_mib() - before
    print(f"{path}: 5 MB request {result['seconds']:.2f} s; small requests {[round(s, 3) for s in small]} s "
          f"(alone {baseline:.3f} s); peak RSS +{grown:.0f} MiB")  # fmt: skip
    assert max(small) - baseline < 1.0
    assert grown < 200


def test_a_failed_replacement_keeps_the_old_model(gemma_gguf: str, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(gemma_gguf, models / "good-270m.gguf")
    (models / "broken.gguf").write_bytes(b"GGUF but not really")
    env = {"LIGHT_MODEL_PATH": gemma_gguf, "LIGHT_PRELOAD": "false", "MEDIUM_N_CTX": "256", "MODELS_DIR": str(models)}
    with live_server(env) as server, server.client() as http:
        res = http.post("/v1/models/medium/load", json={"model_path": "good-270m.gguf"})
        assert res.status_code == 200 and res.json()["id"] == "medium/good-270m"
        res = http.post("/v1/models/medium/load", json={"model_path": "broken.gguf"})
        assert res.status_code == 400, res.text
        error = res.json()["error"]
        assert error["code"] == "model_load_failed" and error["param"] == "model_path"
        assert "broken.gguf" in error["message"] and "medium/good-270m keeps serving" in error["message"]
        card = http.get("/v1/models/medium").json()
        assert card["id"] == "medium/good-270m" and card["status"] == "loaded"
        chat = http.post("/v1/chat/completions", json={"model": "medium", "messages": MSG, "max_tokens": 2})
        assert chat.status_code == 200
        # A good replacement swaps models and says which one it retired.
        os.symlink(gemma_gguf, models / "other-270m.gguf")
        res = http.post("/v1/models/medium/load", json={"model_path": "other-270m.gguf"})
        assert res.status_code == 200 and res.json()["id"] == "medium/other-270m"
        assert res.json()["details"]["replaced"] == "medium/good-270m"
        assert http.post("/v1/chat/completions", json={"model": "medium", "messages": MSG, "max_tokens": 2}).is_success
