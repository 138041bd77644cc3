"""Model lifecycle against real engines: a real GGUF loaded into a tier by path (MODELS_DIR), and a
broken GGUF that llama.cpp refuses, which fails its tier alone. The lifecycle itself (lazy load,
keep-alive, pinning, unload during a stream, failed tiers, load order) is about the app:
tests/app/test_lifecycle.py, on the fake engines."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.batching import wait_until
from tests.live import error_of, live_server

CHAT = {"model": "light", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def test_health_is_503_only_when_no_tier_can_serve(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"nothing useful")
    with live_server({"LIGHT_MODEL_PATH": str(bad)}, wait_for=("light",)) as server, server.client() as http:
        res = http.get("/health")
        assert res.status_code == 503 and res.json()["status"] == "unhealthy"
        assert res.json()["tiers"]["light"]["state"] == "failed"
        assert "broken.gguf" in res.json()["tiers"]["light"]["error"]


def test_a_real_gguf_loads_by_path_inside_models_dir(gemma_gguf: str, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(gemma_gguf, models / "tiny-270m.gguf")
    env = {"LIGHT_MODEL_PATH": gemma_gguf, "LIGHT_PRELOAD": "false", "MEDIUM_N_CTX": "256", "MODELS_DIR": str(models)}
    with live_server(env) as server, server.client() as http:
        res = http.post("/v1/models/medium/load", json={"model_path": "tiny-270m.gguf"})
        assert res.status_code == 200, res.text
        assert res.json()["id"] == "medium/tiny-270m" and res.json()["status"] == "loaded"
        assert res.json()["engine"] == "llamacpp" and res.json()["size_bytes"] == os.path.getsize(gemma_gguf)
        chat = http.post("/v1/chat/completions", json={**CHAT, "model": "medium"})
        assert chat.status_code == 200
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["light/gemma-3-270m", "medium/tiny-270m"]


def test_unloading_while_tokenizing_and_compiling_grammars_never_crashes(gemma_gguf: str) -> None:
    """Unload after unload while `/tokenize` (beside the model's thread) and structured requests (a
    grammar compiling on its own threads) keep coming: each ends cleanly (an answer, or a 503 with
    the error envelope), the process stays up and serves once the model is loaded again."""
    env = {"LIGHT_MODEL_PATH": gemma_gguf, "LIGHT_N_CTX": "4096", "LIGHT_TEMPERATURE": "0"}
    text = "The quick brown fox jumps over the lazy dog. " * 2500  # ~25k tokens each time
    statuses: list[int] = []
    done = threading.Event()

    def tokenize(http: httpx.Client) -> httpx.Response:
        return http.post("/tokenize", json={"model": "light", "prompt": text})

    def structured(http: httpx.Client) -> httpx.Response:
        # A schema of its own each time: compiled grammars are memoised by schema.
        schema = {
            "type": "object",
            "properties": {f"f{i}_{time.monotonic_ns()}": {"type": "integer"} for i in range(40)},
        }
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        return http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4, "response_format": fmt})

    def keep_asking(ask: Callable[[httpx.Client], httpx.Response]) -> None:
        with server.client() as http:
            while not done.is_set():
                res = ask(http)
                statuses.append(res.status_code)
                if res.status_code != 200:
                    error_of(res, 503)

    with live_server(env, wait_for=("light",)) as server, server.client() as http:
        clients = [threading.Thread(target=keep_asking, args=(ask,)) for ask in (tokenize, tokenize, structured)]
        for client in clients:
            client.start()
        try:
            for _ in range(3):
                wait_until(lambda: http.get("/health").json()["tiers"]["light"]["state"] == "loaded", 60)
                assert http.post("/v1/models/light/unload").status_code == 200
        finally:
            done.set()
            for client in clients:
                client.join(60)
        assert statuses and set(statuses) <= {200, 503}
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert http.get("/health").status_code == 200
