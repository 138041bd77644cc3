"""The console at `/` in Chromium, keys off (issue 29): it loads clean under its CSP, streams an
answer in parts, its plots move with traffic, Stop cancels on the server, its admin buttons work
from the same origin, and embeddings and rerank answer."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Playwright, expect

from backends.fake import echo_last_line
from service.controllers.console import CONSOLE_DIR, CONTENT_SECURITY_POLICY, PAGE
from service.testing import counting, fake_engines
from tests.browser.conftest import Watched, launch
from tests.live import LiveServer, live_server

ENV = {
    "LIGHT_MODEL_PATH": "fake/gemma-3-270m",
    "LIGHT_N_CTX": "8192",
    "EMBEDDING_MODEL_PATH": "fake/minilm",
    "RERANKER_MODEL_PATH": "fake/reranker",
    "LIGHT_REASONING_PARSER": "think",  # `<think>...</think>` in an answer is its reasoning
    "STATS_WINDOW_SECONDS": "3600",  # earlier tests' traffic stays in the rates: new traffic only adds
}
CONSOLE = "/?refresh=0.25"
LONG = "count for me"  # a prompt the scripted model answers with ~4,000 tokens
WEATHER = "weather in Paris?"  # ... and one it answers by thinking, then calling a tool
CALL = (
    "<think>They want the weather: ask the tool.</think>"
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def reply(prompt: str) -> str:
    if WEATHER in prompt:
        return CALL
    return counting(prompt) if LONG in prompt else echo_last_line(prompt)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    engines = fake_engines(reply=reply, token_seconds=0.02)
    with live_server(ENV, wait_for=("light", "embedding", "reranker"), engines=engines) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def test_the_page_loads_clean_under_a_strict_csp(
    server: LiveServer, http: httpx.Client, watch: Callable[..., Watched]
) -> None:
    res = http.get("/")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    assert res.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert res.headers["cache-control"] == "no-cache"
    assert "<script>" not in res.text and "style=" not in res.text  # nothing inline for the CSP to refuse
    # The assets carry a hash of their content: cached for good, never stale across versions.
    script = http.get(res.text.split('src="', 1)[1].split('"', 1)[0])
    assert script.status_code == 200 and "immutable" in script.headers["cache-control"]

    console = watch(server.url + CONSOLE)
    page = console.page
    expect(page.locator("#status")).to_have_text("healthy")
    expect(page.locator("#tiers tbody tr")).to_have_count(3)
    expect(page.locator('#tiers tr:has-text("light") .badge')).to_have_text("loaded")
    expect(page.locator("#chat-model option")).to_have_count(1)
    # Plots are drawn from the polled stats.
    expect(page.locator('figure[data-plot="tokens"]')).to_have_attribute("data-last", "0")
    console.assert_clean()
    # An inline script is refused by the page's own policy: the CSP is in force, not only sent.
    page.evaluate("() => { const s = document.createElement('script'); s.textContent = 'window.pwned = 1'; "
                  "document.body.append(s); }")  # fmt: skip
    assert page.evaluate("() => window.pwned") is None
    assert any("Content Security Policy" in p for p in console.problems)


def test_a_streamed_answer_appears_in_parts(server: LiveServer, watch: Callable[..., Watched]) -> None:
    console = watch(server.url + CONSOLE)
    page = console.page
    page.fill("#system", "You are terse.")
    page.fill("#prompt", "Say something streamed back to me")
    # Record every state of the answer as it changes, in the page, from before the request.
    page.evaluate(
        """() => { window.seen = []; new MutationObserver(() => window.seen.push(
             document.querySelector('#answer').textContent)).observe(document.querySelector('#answer'),
             {childList: true, characterData: true, subtree: true}); }"""
    )
    expect(page.locator("#send")).to_be_enabled()  # once the models are listed
    page.click("#send")
    answer = page.locator("#answer")
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer).to_have_text("Say something streamed back to me")
    seen = [s for s in page.evaluate("() => window.seen") if s]
    assert len(seen) > 3 and all(len(a) < len(b) for a, b in itertools.pairwise(seen)), seen
    stats = page.locator("#chat-stats").text_content() or ""
    assert "TTFT" in stats and "completion tokens" in stats, stats
    console.assert_clean()


def test_reasoning_is_folded_and_tool_calls_are_shown_as_calls(
    server: LiveServer, watch: Callable[..., Watched]
) -> None:
    console = watch(server.url + CONSOLE)
    page = console.page
    page.click("#tools-box summary")
    page.fill("#tools", json.dumps(TOOLS))
    page.fill("#prompt", WEATHER)
    expect(page.locator("#send")).to_be_enabled()
    page.click("#send")
    expect(page.locator("#answer")).to_have_attribute("data-state", "done")
    reasoning = page.locator("#reasoning")
    expect(reasoning).to_be_visible()
    expect(reasoning).not_to_have_attribute("open", "")  # folded until the user opens it
    expect(reasoning.locator("pre")).to_have_text("They want the weather: ask the tool.")
    expect(page.locator("#tool-calls li")).to_have_text(['get_weather({"city": "Paris"})'])
    expect(page.locator("#answer")).to_have_text("")  # no <think> or <tool_call> text leaks into the answer
    console.assert_clean()


def test_a_plot_moves_after_traffic(server: LiveServer, http: httpx.Client, watch: Callable[..., Watched]) -> None:
    console = watch(server.url + CONSOLE)
    page = console.page

    def last(plot: str) -> float:
        figure = page.locator(f'figure[data-plot="{plot}"]')
        expect(figure).to_have_attribute("data-last", re.compile(r"^[0-9.]+$"))  # a poll has been drawn
        return float(figure.get_attribute("data-last") or "nan")

    tokens, requests = last("tokens"), last("requests")
    points = page.locator('figure[data-plot="tokens"] polyline').get_attribute("points")
    for i in range(3):
        chat = {"model": "light", "messages": [{"role": "user", "content": f"traffic {i}"}], "max_tokens": 20}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
    # The console's own polling is not traffic: only these requests move the plots.
    page.wait_for_function(
        """([tokens, requests]) => {
             const last = (p) => Number(document.querySelector(`figure[data-plot="${p}"]`).dataset.last);
             return last('tokens') > tokens && last('requests') > requests; }""",
        arg=[tokens, requests],
    )
    assert page.locator('figure[data-plot="tokens"] polyline').get_attribute("points") != points
    console.assert_clean()


def _light(http: httpx.Client) -> dict[str, object]:
    tier: dict[str, object] = http.get("/v1/stats").json()["tiers"]["light"]
    return tier


def test_stop_cancels_the_answer_on_the_server(
    server: LiveServer, http: httpx.Client, watch: Callable[..., Watched]
) -> None:
    console = watch(server.url + CONSOLE)
    page = console.page
    page.fill("#prompt", LONG)
    page.fill("#max-tokens", "5000")  # ~80 s of tokens at the fake's pace: only Stop ends it early
    expect(page.locator("#send")).to_be_enabled()  # once the models are listed
    page.click("#send")
    answer = page.locator("#answer")
    page.wait_for_function("() => Number(document.querySelector('#answer').dataset.chunks) >= 5")
    busy = _light(http)
    assert busy["in_flight"] == 1 and busy["worker"]["state"] == "busy", busy  # type: ignore[index]
    processed = busy["worker"]["processed"]  # type: ignore[index]
    page.click("#stop")
    expect(answer).to_have_attribute("data-state", "stopped")
    # The server notices the closed connection and frees the tier's slot, long before the answer's end
    # (~80 s; the wait gives up after 30 s). Waited for rather than read once idle: the HTTP side and
    # the worker thread each update their own counters, which a loaded machine shows apart.
    page.wait_for_function(
        """async (processed) => { const t = (await (await fetch('/v1/stats')).json()).tiers.light;
                         return t.in_flight === 0 && t.worker.state === 'idle'
                                && t.worker.processed === processed + 1; }""",
        arg=processed,
        polling=100,
    )
    partial = answer.text_content() or ""
    assert partial.startswith("4,5,6,") and len(partial) < len(counting(LONG)), partial
    expect(page.locator("#send")).to_be_enabled()
    console.assert_clean()


def test_admin_buttons_work_from_the_same_origin(
    server: LiveServer, http: httpx.Client, watch: Callable[..., Watched]
) -> None:
    console = watch(server.url + CONSOLE)
    page = console.page
    button = page.locator('button[data-tier="reranker"]')
    expect(button).to_have_text("Unload")
    button.click()
    expect(page.locator("#admin-status")).to_have_attribute("data-outcome", "done")
    assert http.get("/v1/models/reranker").json()["status"] != "loaded"
    expect(button).to_have_text("Load")
    button.click()
    expect(button).to_have_text("Unload")
    assert http.get("/v1/models/reranker").json()["status"] == "loaded"
    console.assert_clean()


def test_embeddings_and_rerank(server: LiveServer, watch: Callable[..., Watched]) -> None:
    console = watch(server.url + CONSOLE)
    page = console.page
    expect(page.locator("#embed-model option")).to_have_count(1)
    page.click("#embed")
    results = page.locator("#vector-results")
    expect(results.locator("thead")).to_contain_text("Cosine to the first")
    expect(results.locator("tbody tr")).to_have_count(3)
    expect(results.locator("tbody tr").first).to_contain_text("1.000")  # the first text against itself
    page.click("#rerank")
    expect(results.locator("thead")).to_contain_text("Score")
    expect(results.locator("tbody tr")).to_have_count(3)
    console.assert_clean()


def test_first_paint_from_a_cold_browser(server: LiveServer, playwright: Playwright, tmp_path: Path) -> None:
    """Measured, not asserted (the machine's load decides it): the README quotes the number."""
    context = launch(playwright, tmp_path / "profile")
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("() => performance.getEntriesByType('paint').length >= 2")
    paint = {
        e["name"]: e["startTime"]
        for e in page.evaluate("() => performance.getEntriesByType('paint').map((e) => e.toJSON())")
    }
    size = PAGE.stat().st_size + sum(p.stat().st_size for p in CONSOLE_DIR.iterdir())
    print(f"\nconsole: first paint {paint['first-paint']:.0f} ms, first contentful paint "
          f"{paint['first-contentful-paint']:.0f} ms, own assets {size / 1024:.1f} KiB")  # fmt: skip
    assert paint["first-paint"] > 0
    context.close()
