"""The console and the OpenAPI UIs in a real browser: Debian's headless Chromium (tests/run.sh
installs it), driven by Playwright, against a live server on the fake engines. Nothing is
downloaded: Playwright is pointed at /usr/bin/chromium, and every page must load with no request
leaving this server, no console error and no Content-Security-Policy violation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, ConsoleMessage, Page, Playwright, Request, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 30_000  # a bound for a stuck page, not a speed target: the machine may be busy
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# Per module: the sync API runs an event loop on this thread while it is open, and a later test's
# asyncio.run() (on the same pytest worker) would fail under it.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not CHROMIUM.exists():
        pytest.fail("tests/browser drive Debian's chromium: `apt-get install -y chromium` (tests/run.sh does it)")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as pw:
        yield pw


def launch(playwright: Playwright, profile: Path) -> BrowserContext:
    """A cold browser: a fresh profile, so no cache and no stored state."""
    context = playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=str(CHROMIUM),
        args=ARGS,
        headless=True,
        viewport={"width": 1280, "height": 1000},
    )
    context.set_default_timeout(TIMEOUT_MS)
    return context


@pytest.fixture(scope="module")
def browser(playwright: Playwright, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    context = launch(playwright, tmp_path_factory.mktemp("chromium-profile"))
    yield context
    context.close()


@dataclass
class Watched:
    """A page and what it did: console errors and warnings (CSP violations are reported there),
    uncaught exceptions, and every URL it requested."""

    page: Page
    origin: str
    problems: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"{message.type}: {message.text}")

    def _request(self, request: Request) -> None:
        self.requests.append(request.url)

    def foreign(self) -> list[str]:
        return [u for u in self.requests if not (u.startswith(self.origin + "/") or u.startswith("data:"))]

    def assert_clean(self, allowed: Callable[[str], bool] = lambda problem: False) -> None:
        problems = [p for p in self.problems if not allowed(p)]
        assert not problems, problems
        assert not self.foreign(), self.foreign()


@pytest.fixture
def watch(browser: BrowserContext) -> Iterator[Callable[[str], Watched]]:
    """`watch(url)`: a new tab on `url`, watched from before its first request; closed afterwards."""
    pages: list[Page] = []

    def open_page(url: str) -> Watched:
        page = browser.new_page()
        pages.append(page)
        origin = "/".join(url.split("/")[:3])
        watched = Watched(page, origin)
        page.on("console", watched._console)
        page.on("pageerror", lambda exc: watched.problems.append(f"pageerror: {exc}"))
        page.on("request", watched._request)
        page.goto(url)
        return watched

    yield open_page
    for page in pages:
        page.close()
