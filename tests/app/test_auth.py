"""API keys on every route, admin keys on admin routes, rate limits, and keys kept secret: the
app in-process on the fake engines (the log test on a live server, which logs as `python -m service`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from service.testing import fake_engines
from tests.live import fake_app, live_server

USER, OTHER_USER, ADMIN = "sk-user-1f2e3d", "sk-user-second", "sk-admin-9a8b7c"
Client = TestClient[Litestar]
LIGHT = {"LIGHT_MODEL_PATH": "fake/gemma-3-270m", "LIGHT_N_CTX": "256"}  # a name: the fake needs no file
CHAT = {"model": "light", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
BODIES: dict[str, dict[str, object]] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": {"model": "light", "prompt": "Hi", "max_tokens": 1},
    "/v1/cache/clear": {"target": "response"},
}


def routes(app: Litestar) -> list[tuple[str, str, bool, bool]]:
    """Every (method, concrete path, public, admin) the app serves, so a new route is covered too."""
    found = []
    for route in app.routes:
        if route.path.startswith("/schema/{"):
            continue  # Litestar's 404 page for document names no UI serves
        for handler in getattr(route, "route_handlers", []):
            for method in sorted(handler.http_methods - {"OPTIONS", "HEAD"}):
                path = re.sub(r"\{model_id[^}]*\}", "light/gemma-3-270m", route.path)
                path = re.sub(
                    r"\{file_path[^}]*\}", "console.js" if "console" in path else "README.md", path
                )  # the console's files
                path = re.sub(r"\{[^}]+\}", "kb", path)  # a collection, a document
                if method == "POST" and "{model_id" in route.path:
                    path += "/load"
                found.append((method, path, bool(handler.opt.get("public")), bool(handler.opt.get("admin"))))
    assert {p for _, p, _, _ in found} >= {"/health", "/metrics", "/v1/stats", "/v1/chat/completions", "/schema", "/"}
    return found


def authorized(res: httpx.Response) -> bool:
    """Past the guard: the handler answered (routes for tiers this server lacks answer 404)."""
    return res.status_code not in (401, 403) and res.status_code < 500


def call(http: httpx.Client, method: str, path: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return http.request(method, path, json=BODIES.get(path) if method == "POST" else None, headers=headers)


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    env = {**LIGHT, "API_KEYS": f"{USER}, {OTHER_USER}", "ADMIN_API_KEYS": ADMIN,
           "COLLECTIONS_DIR": str(tmp_path_factory.mktemp("collections"))}  # fmt: skip
    with fake_app(env) as client:
        yield client


def test_every_route_but_health_needs_a_key(http: Client) -> None:
    for method, path, public, _ in routes(http.app):
        for key in (None, "sk-wrong"):
            res = call(http, method, path, key)
            if public:
                assert res.status_code == 200, (method, path)
                continue
            assert res.status_code == 401, (method, path, key, res.text)
            error = res.json()["error"]
            assert error["type"] == "authentication_error"
            assert error["code"] == ("missing_api_key" if key is None else "invalid_api_key")
            assert "sk-wrong" not in res.text


def test_user_key_opens_user_routes_admin_key_admin_routes(http: Client) -> None:
    for method, path, _, admin in routes(http.app):
        res = call(http, method, path, USER)
        if admin:
            assert res.status_code == 403, (method, path)
            assert res.json()["error"]["type"] == "permission_error"
            res = call(http, method, path, ADMIN)
        assert authorized(res), (method, path, res.text)
    core = [("GET", "/v1/models"), ("GET", "/v1/stats"), ("GET", "/metrics"), ("GET", "/v1/cache/stats"),
            ("POST", "/v1/completions")]  # fmt: skip
    assert [call(http, method, path, USER).status_code for method, path in core] == [200] * len(core)
    # Admin keys are user keys too; other schemes and lower-case "bearer" are handled.
    assert call(http, "POST", "/v1/chat/completions", ADMIN).status_code == 200
    assert http.get("/v1/models", headers={"Authorization": f"bearer {OTHER_USER}"}).status_code == 200
    assert http.get("/v1/models", headers={"Authorization": f"Basic {USER}"}).status_code == 401


def test_openai_sdk_with_keys(http: Client) -> None:
    good = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key=USER, http_client=http, max_retries=0)
    assert good.chat.completions.create(model="light", messages=CHAT["messages"], max_tokens=1).choices  # type: ignore[arg-type]
    bad = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="sk-nope", http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_auth_off_by_default_on_every_route() -> None:
    with fake_app(LIGHT) as http:
        for method, path, _, _ in routes(http.app):
            res = call(http, method, path)
            assert authorized(res), (method, path, res.text)
            assert "X-RateLimit-Limit" not in res.headers


def test_admin_keys_alone_guard_only_admin_routes() -> None:
    with fake_app({**LIGHT, "ADMIN_API_KEYS": ADMIN}) as http:
        for method, path, _, admin in routes(http.app):
            res = call(http, method, path)
            assert res.status_code == 401 if admin else authorized(res), (method, path)
            if admin:
                assert authorized(call(http, method, path, ADMIN))


def test_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# one key per line\nsk-from-file\n")
    with fake_app({**LIGHT, "LIGHT_PRELOAD": "false", "API_KEYS_FILE": str(keys)}) as http:
        assert http.get("/v1/models").status_code == 401
        assert call(http, "GET", "/v1/models", "sk-from-file").status_code == 200


def test_keys_never_reach_the_log(capfd: pytest.CaptureFixture[str]) -> None:
    env = {**LIGHT, "API_KEYS": USER, "LOG_LEVEL": "DEBUG"}
    with live_server(env, wait_for=("light",), engines=fake_engines()) as server, server.client() as http:
        assert call(http, "POST", "/v1/chat/completions", USER).status_code == 200
        assert call(http, "GET", "/v1/models", USER + "x").status_code == 401
    out, err = capfd.readouterr()
    assert "Tier light" in err + out  # the log was captured
    assert USER not in out + err


def test_rate_limit_per_client_without_keys() -> None:
    with fake_app({**LIGHT, "LIGHT_PRELOAD": "false", "RATE_LIMIT_PER_MINUTE": "3"}) as http:
        remaining = []
        for _ in range(3):
            res = http.get("/v1/models")
            assert res.status_code == 200
            assert res.headers["X-RateLimit-Limit"] == "3"
            assert 0 < int(res.headers["X-RateLimit-Reset"]) <= 60
            remaining.append(int(res.headers["X-RateLimit-Remaining"]))
        assert remaining == [2, 1, 0]
        res = http.post("/v1/chat/completions", json=CHAT)
        assert res.status_code == 429
        error = res.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert 1 <= int(res.headers["Retry-After"]) <= 60 and error["retry_after"] == int(res.headers["Retry-After"])
        assert res.headers["X-RateLimit-Remaining"] == "0"
        health = http.get("/health")  # never limited: load balancers poll it
        assert health.status_code == 200 and "X-RateLimit-Limit" not in health.headers


def test_rate_limit_per_key() -> None:
    env = {**LIGHT, "LIGHT_PRELOAD": "false", "RATE_LIMIT_PER_MINUTE": "2", "API_KEYS": f"{USER},{OTHER_USER}"}
    with fake_app(env) as http:
        assert [call(http, "GET", "/v1/models", USER).status_code for _ in range(3)] == [200, 200, 429]
        assert call(http, "GET", "/v1/models", OTHER_USER).headers["X-RateLimit-Remaining"] == "1"
        assert call(http, "GET", "/v1/models", "sk-wrong").status_code == 401  # refused before counting
