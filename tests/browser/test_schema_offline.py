"""The OpenAPI UIs at /schema (Scalar) and /schema/swagger render from the package's own files:
no request leaves this server, so they work on an offline machine (issue 29)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from playwright.sync_api import expect

from service.testing import fake_engines
from tests.browser.conftest import Watched
from tests.live import LiveServer, live_server

ENV = {"LIGHT_MODEL_PATH": "fake/gemma-3-270m", "LIGHT_N_CTX": "1024"}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(ENV, wait_for=("light",), engines=fake_engines()) as live:
        yield live


def test_scalar_renders_offline(server: LiveServer, watch: Callable[..., Watched]) -> None:
    docs = watch(server.url + "/schema")
    page = docs.page
    expect(page.get_by_role("heading", name="llmservice").first).to_be_visible()
    expect(page.locator("main")).to_contain_text("/v1/chat/completions")
    page.wait_for_load_state("networkidle")
    assert any(u.endswith("/schema/openapi.json") for u in docs.requests), docs.requests
    docs.assert_clean()


def test_swagger_renders_offline(server: LiveServer, watch: Callable[..., Watched]) -> None:
    docs = watch(server.url + "/schema/swagger")
    page = docs.page
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("llmservice")
    expect(page.locator(".opblock-summary-path", has_text="/v1/chat/completions").first).to_be_visible()
    page.wait_for_load_state("networkidle")
    docs.assert_clean()


def test_vendored_files_are_served_with_their_licences(server: LiveServer) -> None:
    with server.client() as http:
        for path in ("scalar-1.76.4/LICENSE", "swagger-ui-5.35.0/LICENSE", "swagger-ui-5.35.0/NOTICE"):
            assert http.get(f"/static/openapi/{path}").status_code == 200, path
        res: httpx.Response = http.get("/static/openapi/swagger-ui-5.35.0/swagger-ui-bundle.js")
        assert res.status_code == 200 and "immutable" in res.headers["cache-control"]
        assert http.get("/static/../service/app.py").status_code == 404  # nothing outside the folder
