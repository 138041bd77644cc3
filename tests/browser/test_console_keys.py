"""The console with API keys on (issue 29): the page and its files load without a key, the data
calls wait for the key the user types (kept for the tab only), and an admin button without the
admin key is refused by the server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from playwright.sync_api import expect

from service.testing import fake_engines
from tests.browser.conftest import Watched
from tests.live import LiveServer, live_server

USER, ADMIN = "user-key-123", "admin-key-456"
ENV = {
    "LIGHT_MODEL_PATH": "fake/gemma-3-270m",
    "LIGHT_N_CTX": "1024",
    "API_KEYS": USER,
    "ADMIN_API_KEYS": ADMIN,
}
CONSOLE = "/?refresh=0.25"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(ENV, wait_for=("light",), engines=fake_engines(token_seconds=0.005)) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def refused(status: int) -> Callable[[str], bool]:
    """The browser logs each refused fetch as a console error: expected where the test asks for one."""
    return lambda problem: f"status of {status}" in problem


def test_the_page_asks_for_a_key_before_any_data_call(
    server: LiveServer, http: httpx.Client, watch: Callable[..., Watched]
) -> None:
    assert http.get("/").status_code == 200  # no key needed for the page itself
    assert http.get("/v1/stats").status_code == 401
    console = watch(server.url + CONSOLE)
    page = console.page
    expect(page.locator("#notice")).to_contain_text("needs an API key")
    # The public /health still fills in the tiers.
    expect(page.locator('#tiers tr:has-text("light") .badge')).to_have_text("loaded")
    page.wait_for_function("() => document.querySelectorAll('#plots figure').length === 7")
    assert not any("/v1/" in u for u in console.requests), console.requests
    console.assert_clean()  # not one 401 in the browser's log


def test_with_the_user_key_the_console_works_and_admin_is_refused(
    server: LiveServer, http: httpx.Client, watch: Callable[..., Watched]
) -> None:
    console = watch(server.url + CONSOLE)
    page = console.page
    page.fill("#api-key", USER)
    page.click('#keys button[type="submit"]')
    expect(page.locator("#notice")).to_be_hidden()
    expect(page.locator("#chat-model option")).to_have_count(1)
    assert page.evaluate("() => sessionStorage.getItem('llmservice.apiKey')") == USER
    assert page.evaluate("() => localStorage.length") == 0  # the key is kept for this tab only

    page.fill("#prompt", "keys on, still streaming")
    expect(page.locator("#send")).to_be_enabled()  # once the models are listed
    page.click("#send")
    expect(page.locator("#answer")).to_have_attribute("data-state", "done")
    expect(page.locator("#answer")).to_have_text("keys on, still streaming")

    unload = page.locator('button[data-tier="light"]')
    expect(unload).to_have_text("Unload")
    unload.click()
    status = page.locator("#admin-status")
    expect(status).to_have_attribute("data-outcome", "refused")
    expect(status).to_contain_text("admin_key_required")
    expect(page.locator("#admin-key")).to_be_focused()
    with page.expect_response(lambda r: r.url.endswith("/v1/config") and r.request.method == "PATCH") as refusal:
        page.locator('button[data-pin="light"]').click()
    assert refusal.value.status == 403
    expect(status).to_have_attribute("data-outcome", "refused")
    models = http.get("/v1/models/light", headers={"Authorization": f"Bearer {USER}"}).json()
    assert models["status"] == "loaded" and models["pinned"] is False
    console.assert_clean(allowed=refused(403))
    assert any("status of 403" in p for p in console.problems)


def test_with_the_admin_key_the_admin_buttons_work(
    server: LiveServer, http: httpx.Client, watch: Callable[..., Watched]
) -> None:
    console = watch(server.url + CONSOLE)
    page = console.page
    page.fill("#api-key", USER)
    page.fill("#admin-key", ADMIN)
    page.click('#keys button[type="submit"]')
    button = page.locator('button[data-tier="light"]')
    expect(button).to_have_text("Unload")
    button.click()
    expect(page.locator("#admin-status")).to_have_attribute("data-outcome", "done")
    expect(button).to_have_text("Load")
    button.click()
    expect(button).to_have_text("Unload")
    card = http.get("/v1/models/light", headers={"Authorization": f"Bearer {USER}"}).json()
    assert card["status"] == "loaded"
    # Pinned live (PATCH /v1/config): the unload button is disabled until it is unpinned.
    pin = page.locator('button[data-pin="light"]')
    pin.click()
    expect(pin).to_have_text("Unpin")
    expect(button).to_be_disabled()
    assert http.get("/v1/models/light", headers={"Authorization": f"Bearer {USER}"}).json()["pinned"] is True
    pin.click()
    expect(pin).to_have_text("Pin")
    expect(button).to_be_enabled()
    assert http.get("/v1/models/light", headers={"Authorization": f"Bearer {USER}"}).json()["pinned"] is False
    page.click("#forget-keys")
    assert page.evaluate("() => sessionStorage.length") == 0
    console.assert_clean()
