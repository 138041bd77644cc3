"""A web page the user opens cannot use or administer the server (issue 12, point 1), and proxy
headers are trusted only when configured (point 3). On the fake engines: a live server where the
socket matters (its port in `Host`, a proxy's address), the app in-process where it does not."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from service.testing import fake_engines
from tests.conftest import StartService
from tests.live import LiveServer, error_of, fake_app, live_server

CHAT = {"model": "light", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
EVIL = "http://evil.example"
LIGHT = {"LIGHT_MODEL_PATH": "fake/gemma-3-270m", "LIGHT_N_CTX": "256"}  # a name: the fake needs no file


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(LIGHT, wait_for=("light",), engines=fake_engines()) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def test_a_simple_cross_origin_post_cannot_generate(http: httpx.Client) -> None:
    # What `fetch(url, {method: "POST", body: JSON.stringify(...)})` sends: text/plain, no preflight.
    body = json.dumps(CHAT).encode()
    res = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "text/plain", "Origin": EVIL})
    assert error_of(res, 403)["code"] == "origin_not_allowed"
    # The same body without an Origin (curl with a wrong type) is told what to send.
    res = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "text/plain;charset=UTF-8"})
    error = error_of(res, 415)
    assert error["code"] == "unsupported_media_type" and "application/json" in str(error["message"])
    form = http.post("/v1/embeddings", data={"model": "embedding", "input": "x"})  # an HTML form's body
    assert error_of(form, 415)["type"] == "invalid_request_error"


def test_pages_cannot_administer(http: httpx.Client) -> None:
    for origin in (EVIL, "http://localhost:3000", "null"):
        for path, body in (("/v1/models/light/unload", None), ("/v1/cache/clear", {"target": "all"})):
            res = http.post(path, json=body, headers={"Origin": origin})
            assert error_of(res, 403)["code"] == "origin_not_allowed", (origin, path)
    assert http.get("/v1/models/light").json()["status"] == "loaded"


def test_cors_allows_localhost_pages_only(http: httpx.Client) -> None:
    def preflight(origin: str) -> httpx.Response:
        return http.options(
            "/v1/chat/completions",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type"},
        )  # fmt: skip

    for origin in ("http://localhost:5173", "http://127.0.0.1:8080", "http://[::1]:3000", "http://localhost"):
        res = preflight(origin)
        assert res.status_code in (200, 204) and res.headers["access-control-allow-origin"] == origin
        assert "access-control-allow-credentials" not in res.headers
        chat = http.post("/v1/chat/completions", json=CHAT, headers={"Origin": origin})
        assert chat.status_code == 200 and chat.headers["access-control-allow-origin"] == origin
    for origin in (EVIL, "http://localhost.evil.example", "https://127.0.0.1.evil.example:443", "null"):
        assert "access-control-allow-origin" not in preflight(origin).headers, origin
        error_of(http.get("/v1/models", headers={"Origin": origin}), 403)


def test_dns_rebinding_host_is_refused(http: httpx.Client, server: LiveServer) -> None:
    for host in ("evil.example", f"evil.example:{server.port}", "localhost.evil.example"):
        res = http.post("/v1/chat/completions", json=CHAT, headers={"Host": host})
        error = error_of(res, 400)
        assert error["code"] == "host_not_allowed" and "ALLOWED_HOSTS" in str(error["message"])
        error_of(http.get("/v1/models", headers={"Host": host}), 400)
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]", "app.localhost", "10.0.0.7:80"):
        assert http.get("/v1/models", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_and_origins_are_configurable() -> None:
    env = {**LIGHT, "LIGHT_PRELOAD": "false", "ALLOWED_HOSTS": "llm.lan,*.corp.example",
           "CORS_ORIGINS": "https://app.corp.example"}  # fmt: skip
    with fake_app(env) as http:
        for host in ("llm.lan", "llm.lan:8000", "gpu.corp.example"):
            assert http.get("/v1/models", headers={"Host": host}).status_code == 200
        assert http.get("/v1/models", headers={"Host": "other.lan"}).status_code == 400
        good = http.get("/v1/models", headers={"Origin": "https://app.corp.example"})
        assert good.status_code == 200 and good.headers["access-control-allow-origin"] == "https://app.corp.example"
        assert http.get("/v1/models", headers={"Origin": "http://localhost:3000"}).status_code == 403


def test_admin_routes_need_an_admin_key_whenever_keys_are_on() -> None:
    env = {**LIGHT, "LIGHT_PRELOAD": "false", "API_KEYS": "sk-user"}
    with fake_app(env, headers={"Authorization": "Bearer sk-user"}) as http:
        assert http.get("/v1/models").status_code == 200
        res = http.post("/v1/models/light/unload")
        error = error_of(res, 403)
        assert error["code"] == "admin_key_required" and "ADMIN_API_KEYS" in str(error["message"])
        error_of(http.post("/v1/cache/clear", json={"target": "all"}), 403)


def test_non_loopback_bind_needs_keys(start_service: StartService) -> None:
    res = start_service({"HOST": "0.0.0.0", "LIGHT_MODEL_PATH": "none.gguf"})
    assert res.returncode == 2
    line = res.stderr.strip()
    assert "\n" not in line and "API_KEYS" in line and "ALLOW_INSECURE_BIND=true" in line


def test_forwarded_for_is_ignored_unless_configured() -> None:
    # uvicorn, not the app, reads X-Forwarded-For (FORWARDED_ALLOW_IPS): a real server.
    env = {**LIGHT, "LIGHT_PRELOAD": "false", "RATE_LIMIT_PER_MINUTE": "2"}
    with live_server(env, engines=fake_engines()) as server, server.client() as http:
        codes = [http.get("/v1/models", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(4)]
        assert codes == [200, 200, 429, 429]
    # Behind a configured proxy, its X-Forwarded-For names the client.
    with (
        live_server({**env, "FORWARDED_ALLOW_IPS": "127.0.0.1"}, engines=fake_engines()) as server,
        server.client() as http,
    ):
        codes = [http.get("/v1/models", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(4)]
        assert codes == [200] * 4
