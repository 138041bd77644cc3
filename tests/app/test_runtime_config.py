"""GET/PATCH /v1/config on a real server (uvicorn, on the fake engines): changes checked as `.env`
values are, applied to the next requests, and written back to `.env` line by line when asked."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.settings import load_settings
from service.testing import fake_engines
from tests.live import LiveServer, error_of, live_server

USER, ADMIN = "sk-user-cfg", "sk-admin-cfg"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
ENV_TEXT = """# my settings
LIGHT_N_CTX=512   # context
LIGHT_TEMPERATURE=0.7  # a little creative
# LIGHT_MAX_TOKENS=99 (a comment keeps its line)
RATE_LIMIT_PER_MINUTE=0
"""


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / ".env"
    path.write_text(ENV_TEXT)
    return path


@pytest.fixture(scope="module")
def server(env_file: Path) -> Iterator[LiveServer]:
    env = {"LIGHT_MODEL_PATH": "fake/light", "LIGHT_N_CTX": "512", "LIGHT_TEMPERATURE": "0",
           "API_KEYS": USER, "ADMIN_API_KEYS": ADMIN, "LIGHT_N_THREADS": "1"}  # fmt: skip
    with live_server(env, wait_for=("light",), env_file=env_file, engines=fake_engines()) as live:
        yield live


def patch(http: httpx.Client, body: object, headers: dict[str, str] = AS_ADMIN) -> httpx.Response:
    return http.patch("/v1/config", json=body, headers=headers)


def test_get_shows_effective_settings_with_keys_masked(server: LiveServer) -> None:
    with server.client(headers={"Authorization": f"Bearer {USER}"}) as http:
        res = http.get("/v1/config")
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["server"]["api_keys"] == body["server"]["admin_api_keys"] == "********"
    assert USER not in res.text and ADMIN not in res.text
    assert body["tiers"]["light"]["n_ctx"] == 512
    assert body["tiers"]["light"]["temperature"] == 0
    assert "temperature" in body["live"]["tiers"] and body["live"]["server"] == ["rate_limit_per_minute"]


def test_patch_needs_an_admin_key_and_no_page(server: LiveServer) -> None:
    with server.client() as http:
        assert error_of(patch(http, {"tiers": {"light": {"top_k": 5}}}, {}), 401)["code"] == "missing_api_key"
        user = {"Authorization": f"Bearer {USER}"}
        assert error_of(patch(http, {"tiers": {"light": {"top_k": 5}}}, user), 403)["code"] == "admin_key_required"
        page = {**AS_ADMIN, "Origin": "http://localhost:3000"}
        assert error_of(patch(http, {"tiers": {"light": {"top_k": 5}}}, page), 403)["code"] == "origin_not_allowed"
    assert server.app.state.registry.slots["light"].settings.top_k is None  # nothing changed: still unset


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tiers": {"light": {"tempreature": 0.2}}}, "tiers.light.tempreature", "did you mean temperature"),
        ({"tiers": {"light": {"n_ctx": 256}}}, "tiers.light.n_ctx", "LIGHT_N_CTX"),
        ({"tiers": {"light": {"temperature": 9}}}, "tiers.light.temperature", "LIGHT_TEMPERATURE='9'"),
        ({"tiers": {"light": {"max_tokens": "lots"}}}, "tiers.light.max_tokens", "must be a JSON number"),
        ({"tiers": {"light": {"temperature": "0.3"}}}, "tiers.light.temperature", "not the string '0.3'"),
        ({"tiers": {"light": {"max_tokens": 2.5}}}, "tiers.light.max_tokens", "LIGHT_MAX_TOKENS='2.5'"),
        ({"tiers": {"light": {"max_tokens": 10**9}}}, "tiers.light.max_tokens", "MAX_TOKENS_LIMIT"),
        ({"tiers": {"light": {"top_k": [1]}}}, "tiers.light.top_k", "number"),
        ({"tiers": {"light": {"top_k": "9" * 1000}}}, "tiers.light.top_k", "must be a JSON number"),
        ({"tiers": {"heavy": {"top_k": 5}}}, "tiers.heavy", "HEAVY_MODEL_PATH"),
        ({"tiers": {"huge": {"top_k": 5}}}, "tiers.huge", "Unknown tier"),
        ({"server": {"api_keys": ""}}, "server.api_keys", "cannot change while the server runs"),
        ({"server": {"rate_limit_per_minute": -1}}, "server.rate_limit_per_minute", "RATE_LIMIT_PER_MINUTE"),
        ({"temperature": 0.2}, "temperature", "unknown field"),
        ({}, None, "Nothing to change"),
        ({"tiers": {"x" * 5000: {}}}, None, "at most 100 characters"),
    ],
)
def test_bad_changes_are_refused_naming_the_key(
    server: LiveServer, body: dict[str, object], param: str | None, words: str
) -> None:
    before = server.app.state.registry.slots["light"].settings
    with server.client() as http:
        error = error_of(patch(http, body), 400)
    assert error["param"] == param
    assert words in str(error["message"])
    assert server.app.state.registry.slots["light"].settings == before


def test_a_change_applies_to_the_next_requests(server: LiveServer, env_file: Path) -> None:
    user = {"Authorization": f"Bearer {USER}"}
    with server.client() as http:
        res = patch(http, {"tiers": {"light": {"max_tokens": 2, "max_queue": 3}}})
        assert res.status_code == 200, res.text
        assert res.json()["changed"] == {"LIGHT_MAX_TOKENS": "2", "LIGHT_MAX_QUEUE": "3"}
        assert res.json()["tiers"]["light"]["max_tokens"] == 2
        assert res.json()["persisted"] is False
        done = http.post("/v1/completions", json={"model": "light", "prompt": "Once upon a time"}, headers=user)
        assert done.status_code == 200, done.text
        assert done.json()["usage"]["completion_tokens"] == 2
        assert done.json()["choices"][0]["finish_reason"] == "length"
        details = http.get("/v1/models/light", headers=user).json()["details"]
        assert details["max_queue"] == 3
        assert http.get("/v1/config", headers=user).json()["tiers"]["light"]["max_tokens"] == 2
    assert server.app.state.registry.slots["light"].worker.max_queue == 3
    assert env_file.read_text() == ENV_TEXT  # not persisted unless asked


def test_rate_limit_changes_live(server: LiveServer) -> None:
    user = {"Authorization": f"Bearer {USER}"}
    with server.client() as http:
        assert patch(http, {"server": {"rate_limit_per_minute": 2}}).status_code == 200
        try:
            statuses = [http.get("/v1/models", headers=user).status_code for _ in range(3)]
            assert statuses == [200, 200, 429]
        finally:
            assert patch(http, {"server": {"rate_limit_per_minute": 0}}).status_code == 200
        assert http.get("/v1/models", headers=user).status_code == 200


def test_keep_alive_set_live_unloads_an_idle_tier(server: LiveServer) -> None:
    with server.client() as http:
        assert patch(http, {"tiers": {"light": {"keep_alive": 1}}}).status_code == 200
        try:
            deadline = time.monotonic() + 20
            while http.get("/health").json()["tiers"]["light"]["state"] == "loaded":
                assert time.monotonic() < deadline, "the tier was not unloaded after KEEP_ALIVE"
                time.sleep(0.2)
        finally:
            assert patch(http, {"tiers": {"light": {"keep_alive": 0}}}).status_code == 200


def test_pin_set_live_protects_a_tier_from_unload(server: LiveServer) -> None:
    with server.client() as http:
        assert patch(http, {"tiers": {"light": {"pin": True}}}).status_code == 200
        try:
            assert http.get("/v1/models/light", headers=AS_ADMIN).json()["pinned"] is True
            assert error_of(http.post("/v1/models/light/unload", headers=AS_ADMIN), 400)["code"] == "model_pinned"
        finally:
            assert patch(http, {"tiers": {"light": {"pin": False}}}).status_code == 200
        assert http.get("/v1/models/light", headers=AS_ADMIN).json()["pinned"] is False
        assert http.post("/v1/models/light/unload", headers=AS_ADMIN).status_code == 200
        assert http.post("/v1/models/light/load", headers=AS_ADMIN).status_code == 200


def test_persist_edits_only_the_changed_lines(server: LiveServer, env_file: Path) -> None:
    with server.client() as http:
        res = patch(http, {"tiers": {"light": {"temperature": 0.25, "top_p": 0.5}}, "persist": True})
    assert res.status_code == 200, res.text
    assert res.json()["persisted"] is True
    expected = ENV_TEXT.replace("LIGHT_TEMPERATURE=0.7", "LIGHT_TEMPERATURE=0.25") + "LIGHT_TOP_P=0.5\n"
    assert env_file.read_text() == expected
    again = load_settings(env_file, {}).tier("light")
    assert (again.temperature, again.top_p, again.n_ctx) == (0.25, 0.5, 512)
    slot = server.app.state.registry.slots["light"]
    assert (slot.settings.temperature, slot.settings.top_p) == (0.25, 0.5)


def test_persist_without_an_env_file_is_refused() -> None:
    env = {"LIGHT_MODEL_PATH": "fake/light", "LIGHT_PRELOAD": "false"}
    with live_server(env, engines=fake_engines()) as live, live.client() as http:
        error = error_of(patch(http, {"tiers": {"light": {"top_k": 5}}, "persist": True}, {}), 400)
        assert error["param"] == "persist"
        assert live.app.state.registry.slots["light"].settings.top_k is None  # refused as a whole: still unset
