"""Responses and Messages requests relayed as they are to upstreams that serve those APIs
(`{TIER}_REMOTE_PASSTHROUGH`, issue 28): the upstreams are llmservice processes on the fake
engines, whose /metrics count requests per route, so a test tells a relayed request (it reached
the upstream's /v1/responses or /v1/messages) from a translated one (its /v1/chat/completions)."""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import httpx
import openai
import pytest

from service.settings import SettingsError, parse_settings
from tests.live import LiveServer, live_server
from tests.upstreams import Upstream, bad_server, upstreams

MEDIUM = ("medium",)


def _env(*urls: str, passthrough: str = "responses,messages", **extra: str) -> dict[str, str]:
    # The front's tier is `medium`; the upstreams serve their model as `light`: names to rewrite.
    return {
        "MEDIUM_BACKEND": "remote",
        "MEDIUM_REMOTE_URLS": ",".join(urls),
        "MEDIUM_REMOTE_PASSTHROUGH": passthrough,
        **extra,
    }


@pytest.fixture(scope="module")
def ups() -> Iterator[list[Upstream]]:
    with upstreams((0.0, "echo"), (0.0, "echo")) as started:
        yield started


@pytest.fixture(scope="module")
def front(ups: list[Upstream]) -> Iterator[LiveServer]:
    with live_server(_env(*(u.url for u in ups)), wait_for=MEDIUM) as server:
        yield server


def _routes(ups: list[Upstream]) -> dict[str, float]:
    """Requests each route of the upstreams answered, summed over them (from their /metrics)."""
    counts: dict[str, float] = {}
    for upstream in ups:
        text = httpx.get(f"{upstream.url.removesuffix('/v1')}/metrics").text
        for route, value in re.findall(r'^llmservice_requests_total\{[^}]*route="([^"]+)"[^}]*\} (\S+)', text, re.M):
            counts[route] = counts.get(route, 0.0) + float(value)
    return counts


def _sent(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """The generation routes that got requests (not the health checks' /v1/models)."""
    return {
        r: int(after[r] - before.get(r, 0.0))
        for r in after
        if r.startswith("/v1/") and r != "/v1/models" and after[r] > before.get(r, 0.0)
    }


def _completion_tokens(front: LiveServer) -> float:
    text = httpx.get(f"{front.url}/metrics").text
    found = re.search(r'^llmservice_completion_tokens_total\{tier="medium"\} (\S+)', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_passthrough_value_other_than_responses_or_messages_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"MEDIUM_REMOTE_PASSTHROUGH.*expected one of: responses, messages"):
        parse_settings(_env("http://127.0.0.1:9/v1", passthrough="responses,chat"))
    with pytest.raises(SettingsError, match="MEDIUM_REMOTE_PASSTHROUGH applies to a remote tier only"):
        parse_settings({"MEDIUM_MODEL_PATH": "fake/x", "MEDIUM_REMOTE_PASSTHROUGH": "responses"})


def test_responses_pass_through_with_the_openai_sdk(front: LiveServer, ups: list[Upstream]) -> None:
    client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="none")
    before, tokens = _routes(ups), _completion_tokens(front)
    answer = client.responses.create(model="medium", input="relayed whole")
    assert answer.output_text == "relayed whole" and answer.model == "medium"
    events = list(client.responses.create(model="medium", input="relayed streamed", stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "relayed streamed"
    assert events[-1].type == "response.completed" and events[-1].response.model == "medium"
    assert [e.sequence_number for e in events] == list(range(len(events)))  # the upstream's own events
    assert _sent(before, _routes(ups)) == {"/v1/responses": 2}
    # Usage read from the upstream's answers reaches our metrics.
    assert _completion_tokens(front) - tokens == len("relayed whole") + len("relayed streamed")


def test_messages_pass_through_with_the_anthropic_sdk(front: LiveServer, ups: list[Upstream]) -> None:
    client = anthropic.Anthropic(base_url=front.url, api_key="none")
    before = _routes(ups)
    asked: dict[str, Any] = {"model": "medium", "max_tokens": 64}
    message = client.messages.create(**asked, messages=[{"role": "user", "content": "anthropic whole"}])
    assert message.content[0].type == "text" and message.content[0].text == "anthropic whole"
    assert message.model == "medium" and message.usage.output_tokens > 0
    with client.messages.stream(**asked, messages=[{"role": "user", "content": "anthropic streamed"}]) as stream:
        assert "".join(stream.text_stream) == "anthropic streamed"
        final = stream.get_final_message()
    assert final.model == "medium" and final.stop_reason == "end_turn"
    assert _sent(before, _routes(ups)) == {"/v1/messages": 2}


def test_only_the_named_apis_pass_through(ups: list[Upstream]) -> None:
    with live_server(_env(ups[0].url, passthrough="responses"), wait_for=MEDIUM) as front, front.client() as http:
        before = _routes(ups)
        body = {"model": "medium", "max_tokens": 32, "messages": [{"role": "user", "content": "translated"}]}
        res = http.post("/v1/messages", json=body)
        assert res.status_code == 200 and res.json()["content"][0]["text"] == "translated", res.text
        assert _sent(before, _routes(ups)) == {"/v1/chat/completions": 1}


@contextmanager
def recording_upstream() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A Messages upstream that notes each request (path, headers, body) and answers one message,
    or a 400 in Anthropic's form when the prompt says `refuse`."""
    seen: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            sent = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.endswith("/models"):
                status, body = 200, {"data": [{"id": "upstream-model"}]}
            else:
                request = json.loads(sent)
                seen.append({"path": self.path, "headers": dict(self.headers.items()), "body": request})
                if "refuse" in json.dumps(request["messages"]):
                    error = {"type": "invalid_request_error", "message": "refused upstream"}
                    status, body = 400, {"type": "error", "error": error}
                else:
                    usage = {"input_tokens": 7, "output_tokens": 2}
                    content = [{"type": "text", "text": "ok"}]
                    status, body = 200, {"id": "msg_1", "type": "message", "role": "assistant", "content": content}
                    body |= {"model": request["model"], "stop_reason": "end_turn", "usage": usage}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


def test_messages_headers_model_and_a_relayed_4xx() -> None:
    """The upstream gets Anthropic's headers and REMOTE_API_KEY, the body with its own model name;
    its 400 reaches the client as it wrote it, and does not eject it."""
    with recording_upstream() as (url, seen):
        env = _env(url, MEDIUM_REMOTE_API_KEY="secret", MEDIUM_REMOTE_MODEL="upstream-model")
        with live_server(env, wait_for=MEDIUM) as front, front.client() as http:
            body = {
                "model": "medium",
                "max_tokens": 16,
                "metadata": {"user_id": "u-1"},
                "messages": [{"role": "user", "content": "hi"}],
            }
            res = http.post("/v1/messages", json=body, headers={"anthropic-beta": "tools-2024"})
            assert res.status_code == 200, res.text
            assert res.json()["model"] == "medium" and res.json()["content"] == [{"type": "text", "text": "ok"}]
            got = seen[-1]
            assert got["path"] == "/v1/messages" and got["body"] == {**body, "model": "upstream-model"}
            headers = {k.lower(): v for k, v in got["headers"].items()}
            assert headers["x-api-key"] == "secret" and headers["authorization"] == "Bearer secret"
            assert headers["anthropic-version"] == "2023-06-01" and headers["anthropic-beta"] == "tools-2024"
            for _ in range(4):  # more than the failures in a row that eject an upstream
                refused = http.post("/v1/messages", json={**body, "messages": [{"role": "user", "content": "refuse"}]})
                assert refused.status_code == 400
                assert refused.json() == {
                    "type": "error",
                    "error": {"type": "invalid_request_error", "message": "refused upstream"},
                }
            upstream = http.get("/v1/models").json()["data"][0]["upstreams"][0]
            assert upstream["state"] == "healthy" and upstream["errors"] == 0


@pytest.mark.parametrize("kind", ["500", "garbage"])
def test_retried_on_another_upstream_before_the_first_byte(ups: list[Upstream], kind: str) -> None:
    with bad_server(kind) as bad, live_server(_env(bad, ups[0].url), wait_for=MEDIUM) as front:
        client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="none")
        for i in range(4):
            assert client.responses.create(model="medium", input=f"whole {i}").output_text == f"whole {i}"
            streamed = client.responses.create(model="medium", input=f"streamed {i}", stream=True)
            assert "".join(e.delta for e in streamed if e.type == "response.output_text.delta") == f"streamed {i}"
        view = {u["url"]: u for u in httpx.get(f"{front.url}/v1/models").json()["data"][0]["upstreams"]}
        assert view[bad]["errors"] >= 1 and view[ups[0].url]["errors"] == 0


def _in_flight(upstream: Upstream) -> int:
    return int(httpx.get(f"{upstream.url}/models").json()["data"][0]["in_flight"])


def test_disconnect_closes_the_upstream_request_and_a_cut_stream_ends_with_an_error() -> None:
    words = " ".join(f"w{i}" for i in range(100))  # ~20 s of tokens at 50 ms each
    body = {"model": "medium", "input": words, "stream": True}
    with upstreams((0.05, "echo")) as slow, live_server(_env(slow[0].url), wait_for=MEDIUM) as front:
        with httpx.stream("POST", f"{front.url}/v1/responses", json=body, timeout=30) as res:
            lines = res.iter_lines()  # kept: a dropped line iterator closes the response
            while "response.output_text.delta" not in next(lines):
                pass
            assert _in_flight(slow[0]) == 1
        deadline = time.monotonic() + 5
        while _in_flight(slow[0]):
            assert time.monotonic() < deadline, "the upstream still generates for a client that left"
            time.sleep(0.05)
        assert httpx.get(f"{front.url}/v1/models").json()["data"][0]["upstreams"][0]["in_flight"] == 0

        turns = [{"role": "user", "content": words}]
        messages = {"model": "medium", "max_tokens": 400, "stream": True, "messages": turns}
        with httpx.stream("POST", f"{front.url}/v1/messages", json=messages, timeout=30) as res:
            events = []
            for line in res.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    if line == "event: content_block_delta" and len(events) == 4:
                        slow[0].kill()  # after the first bytes: the stream ends with one error event
    assert events[:2] == ["message_start", "content_block_start"] and events[-1] == "error"
    assert "message_stop" not in events
