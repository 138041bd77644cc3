"""Model lifecycle over HTTP on the fake engines: lazy load, keep-alive, pinning, admin
load/unload, failed tiers, load by path. Streams run on a real socket (`live_server`): a test reads
a stream while it unloads or waits. A real GGUF loaded by path and a broken GGUF refused by
llama.cpp are in tests/api/test_lifecycle_real_model.py."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.testing import counting, fake_engines
from service.tiers.families import EngineFactories
from tests.live import LiveServer, fake_app, live_server

CHAT = {"model": "light", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def counting_engines(token_seconds: float) -> EngineFactories:
    return fake_engines(reply=counting, token_seconds=token_seconds)


def wait_until(predicate: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def state(http: httpx.Client, tier: str = "light") -> str:
    return str(http.get("/health").json()["tiers"][tier]["state"])


def card(http: httpx.Client, model: str = "light") -> dict[str, object]:
    res = http.get(f"/v1/models/{model}")
    assert res.status_code == 200, res.text
    return res.json()  # type: ignore[no-any-return]


@pytest.fixture
def model_file(tmp_path: Path) -> str:
    """A file for a fake model: what is on disk is what the cards report."""
    path = tmp_path / "gemma-3-270m.gguf"
    path.write_bytes(b"fake weights" * 100)
    return str(path)


def test_lazy_load_on_first_request(model_file: str) -> None:
    env = {"LIGHT_MODEL_PATH": model_file, "LIGHT_N_CTX": "256", "LIGHT_PRELOAD": "false"}
    with live_server(env, engines=fake_engines()) as server, server.client() as http:
        # Start-up is over once the server answers: a preload would have begun by now.
        assert server.app.state.registry.slots["light"].load_task is None
        assert state(http) == "available"
        before = card(http)
        assert before["status"] == "available" and before["usage_count"] == 0
        assert before["size_bytes"] == os.path.getsize(model_file) and before["context_length"] == 256
        assert "loaded_at" not in before and "last_used" not in before
        assert http.get("/health").status_code == 200  # a tier that can load still serves
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        after = card(http)
        assert after["status"] == "loaded" and after["engine"] == "fake" and after["usage_count"] == 1
        assert isinstance(after["last_used"], int) and isinstance(after["loaded_at"], int)
        details = after["details"]
        assert isinstance(details, dict) and details["load_seconds"] > 0 and details["path"] == model_file


def test_idle_unload_after_keep_alive_then_reload() -> None:
    env = {"LIGHT_MODEL_PATH": "fake/light", "LIGHT_N_CTX": "256", "LIGHT_KEEP_ALIVE": "1"}
    with fake_app(env) as http:
        assert card(http)["keep_alive"] == 1
        wait_until(lambda: state(http) == "available", 15)
        assert http.app.state.registry.slots["light"].engine is None  # the memory is really freed
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert state(http) == "loaded"
        wait_until(lambda: state(http) == "available", 15)


def test_pinned_tier_is_never_unloaded() -> None:
    # MEDIUM, idle as long with the same keep-alive but not pinned, shows when the unloader has acted.
    env = {"LIGHT_MODEL_PATH": "fake/light", "LIGHT_N_CTX": "256", "LIGHT_KEEP_ALIVE": "1", "LIGHT_PIN": "true",
           "MEDIUM_MODEL_PATH": "fake/medium", "MEDIUM_KEEP_ALIVE": "1"}  # fmt: skip
    with fake_app(env) as http:
        wait_until(lambda: state(http, "medium") == "available", 15)
        assert state(http) == "loaded" and card(http)["pinned"] is True
        res = http.post("/v1/models/light/unload")
        assert res.status_code == 400 and res.json()["error"]["code"] == "model_pinned"
        assert state(http) == "loaded"


def test_a_long_stream_keeps_its_model_past_keep_alive() -> None:
    env = {"LIGHT_MODEL_PATH": "fake/light", "LIGHT_N_CTX": "1024", "LIGHT_KEEP_ALIVE": "1", "LIGHT_TEMPERATURE": "0",
           "MEDIUM_MODEL_PATH": "fake/medium", "MEDIUM_KEEP_ALIVE": "1"}  # fmt: skip
    body = {"model": "light", "prompt": "Count: 1, 2, 3,", "max_tokens": 400, "stream": True}
    # 400 tokens take 3.2 s: well past the keep-alive and the unloader's tick.
    with (
        live_server(env, wait_for=("light", "medium"), engines=counting_engines(0.008)) as server,
        server.client() as http,
    ):
        worker = server.app.state.registry.slots["light"].worker
        with http.stream("POST", "/v1/completions", json=body) as res:
            lines = res.iter_lines()
            next(lines)
            # MEDIUM, used after the stream began, is unloaded once idle for the keep-alive: light
            # has been idle that long too, but for its stream.
            assert http.post("/v1/chat/completions", json={**CHAT, "model": "medium"}).status_code == 200
            wait_until(lambda: state(http, "medium") == "available", 15)
            assert worker.busy and state(http) == "loaded"
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
        wait_until(lambda: state(http) == "available", 15)  # idle again: now it goes


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    env = {"LIGHT_MODEL_PATH": "fake/light", "LIGHT_N_CTX": "1024", "LIGHT_TEMPERATURE": "0"}
    with live_server(env, wait_for=("light",), engines=counting_engines(0.003)) as live:
        yield live


def test_unload_waits_for_a_running_stream(server: LiveServer) -> None:
    body = {"model": "light", "prompt": "Count: 1, 2, 3,", "max_tokens": 300, "stream": True}
    unloaded: dict[str, object] = {}
    with server.client() as http:
        assert state(http) == "loaded" or http.post("/v1/models/light/load").status_code == 200
        with http.stream("POST", "/v1/completions", json=body) as res:
            lines = res.iter_lines()
            next(lines)  # the worker is generating for this stream now

            def unload() -> None:
                with server.client() as admin:
                    response = admin.post("/v1/models/light/unload")
                    unloaded.update(status=response.status_code, body=response.json())

            thread = threading.Thread(target=unload)
            thread.start()
            events = [line for line in lines if line.startswith("data: ")]
        thread.join(60)
        # The stream ran to its natural end: no error event, every token, then [DONE].
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events) and len(events) > 50
        assert unloaded["status"] == 200
        body_ = unloaded["body"]
        assert isinstance(body_, dict) and body_["details"]["waited_for_requests"] == 1
        assert body_["status"] == "available" and state(http) == "available"
        # Loading again (explicitly, then during a stream) never disturbs the stream either.
        loaded = http.post("/v1/models/light/load")
        assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
        with http.stream("POST", "/v1/completions", json=body) as res:
            lines = res.iter_lines()
            next(lines)
            assert http.post("/v1/models/light/load").json()["status"] == "loaded"
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)


def test_requests_during_an_unload_wait_and_are_served(server: LiveServer) -> None:
    body = {"model": "light", "prompt": "Count: 1, 2, 3,", "max_tokens": 120, "stream": True}
    results: list[int] = []
    with server.client() as http:
        http.post("/v1/models/light/load")
        with http.stream("POST", "/v1/completions", json=body) as res:
            lines = res.iter_lines()
            next(lines)
            unload = threading.Thread(target=lambda: httpx.post(f"{server.url}/v1/models/light/unload", timeout=60))
            unload.start()
            wait_until(lambda: state(http) != "loaded")
            # This request arrives while the old model still finishes the stream: it waits, then loads.
            late = threading.Thread(
                target=lambda: results.append(
                    httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=60).status_code
                )
            )
            late.start()
            list(lines)
        unload.join(60)
        late.join(60)
    assert results == [200]


def test_unknown_and_absent_models(server: LiveServer) -> None:
    with server.client() as http:
        assert http.post("/v1/models/nope/load").json()["error"]["code"] == "model_not_found"
        res = http.post("/v1/models/heavy/load")
        assert res.status_code == 404 and res.json()["error"]["message"] == "No models available for tier: heavy"
        assert http.post("/v1/models/heavy/unload").status_code == 404
        assert http.post("/v1/models/light/explode").status_code == 404
        assert http.get("/v1/models/light").json()["status"] in ("loaded", "available", "loading")


def test_max_tokens_limit() -> None:
    env = {"LIGHT_MODEL_PATH": "fake/light", "LIGHT_N_CTX": "256", "MAX_TOKENS_LIMIT": "64", "LIGHT_MAX_TOKENS": "8"}
    with fake_app(env) as http:
        res = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 65})
        assert res.status_code == 400
        error = res.json()["error"]
        assert error["param"] == "max_tokens" and "MAX_TOKENS_LIMIT" in error["message"]
        res = http.post("/v1/completions", json={"model": "light", "prompt": "Hi", "max_tokens": 1000})
        assert res.status_code == 400
        assert http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 64}).status_code == 200


def broken(path: str) -> bool:
    return Path(path).name == "broken.gguf"


def test_failed_tier_is_isolated(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really" * 100)
    env = {"LIGHT_MODEL_PATH": "fake/light", "LIGHT_N_CTX": "256", "MEDIUM_MODEL_PATH": str(bad)}
    engines = fake_engines(fails_to_load=broken)
    with live_server(env, wait_for=("light", "medium"), engines=engines) as server, server.client() as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "healthy"
        medium = health.json()["tiers"]["medium"]
        assert medium["state"] == "failed" and "broken.gguf" in medium["error"]
        medium_card = card(http, "medium")
        assert medium_card["status"] == "failed" and medium_card["error"] == medium["error"]
        res = http.post("/v1/chat/completions", json={**CHAT, "model": "medium"})
        assert res.status_code == 503 and medium["error"] in res.json()["error"]["message"]
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        # An admin load retries and reports the same reason.
        res = http.post("/v1/models/medium/load")
        assert res.status_code == 503 and "broken.gguf" in res.json()["error"]["message"]


def test_health_is_503_only_when_no_tier_can_serve(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"nothing useful")
    engines = fake_engines(fails_to_load=broken)
    env = {"LIGHT_MODEL_PATH": str(bad)}
    with live_server(env, wait_for=("light",), engines=engines) as server, server.client() as http:
        res = http.get("/health")
        assert res.status_code == 503 and res.json()["status"] == "unhealthy"
        assert res.json()["tiers"]["light"]["state"] == "failed"


def test_load_by_path_only_inside_models_dir(model_file: str, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(model_file, models / "tiny-270m.gguf")
    (tmp_path / "secret.gguf").write_bytes(b"not for you")
    env = {"LIGHT_MODEL_PATH": model_file, "LIGHT_N_CTX": "256", "MEDIUM_N_CTX": "256", "MODELS_DIR": str(models)}
    with fake_app(env) as http:
        for path in ("../secret.gguf", str(tmp_path / "secret.gguf"), "/etc/passwd", "../../../../etc/passwd"):
            res = http.post("/v1/models/medium/load", json={"model_path": path})
            assert res.status_code == 403, (path, res.text)
            error = res.json()["error"]
            assert error["type"] == "permission_error" and error["param"] == "model_path"
        assert http.post("/v1/models/medium/load", json={"model_path": "missing.gguf"}).status_code == 400
        assert "medium" not in http.get("/health").json()["tiers"]
        res = http.post("/v1/models/medium/load", json={"model_path": "tiny-270m.gguf"})
        assert res.status_code == 200, res.text
        assert res.json()["id"] == "medium/tiny-270m" and res.json()["status"] == "loaded"
        chat = http.post("/v1/chat/completions", json={**CHAT, "model": "medium"})
        assert chat.status_code == 200
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["light/gemma-3-270m", "medium/tiny-270m"]


def test_load_by_path_is_refused_without_models_dir(model_file: str) -> None:
    env = {"LIGHT_MODEL_PATH": model_file, "LIGHT_N_CTX": "256"}
    with fake_app(env) as http:
        res = http.post("/v1/models/light/load", json={"model_path": model_file})
        assert res.status_code == 403 and "MODELS_DIR" in res.json()["error"]["message"]
        assert card(http)["status"] == "loaded"


def test_tiers_load_one_at_a_time_in_tier_order(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.tiers.registry import Registry
    from service.tiers.slots import TierSlot

    spans: list[tuple[str, float, float]] = []
    real = Registry._load_sync

    def timed(self: Registry, slot: TierSlot) -> None:
        started = time.monotonic()
        try:
            real(self, slot)
        finally:
            spans.append((slot.name, started, time.monotonic()))

    monkeypatch.setattr(Registry, "_load_sync", timed)
    env = {"LIGHT_MODEL_PATH": "fake/light", "MEDIUM_MODEL_PATH": "fake/medium", "HEAVY_MODEL_PATH": "fake/heavy"}
    # Loads that take a while, as real ones do, so that two at once would overlap.
    with fake_app(env, engines=fake_engines(load_seconds=0.1)):
        pass
    spans.sort(key=lambda span: span[1])
    assert [name for name, _, _ in spans] == ["light", "medium", "heavy"]
    assert all(earlier[2] <= later[1] for earlier, later in itertools.pairwise(spans))
