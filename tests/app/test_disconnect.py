"""A client that goes away stops its generation, on every generating endpoint, streaming or not,
whether its job runs or still waits in the queue. On the fake engines over a real socket
(`live_server`): a client that times out closes its connection, as `curl -m` does. The same on
llama.cpp (the batch's slot is freed) is in tests/api/test_llamacpp_batching.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.testing import counting, fake_engines
from tests.batching import held, wait_until
from tests.live import LiveServer, live_server

# About 3,900 one-byte tokens of 5 ms each: a client that stays would wait 20 s.
LONG = 3000
PROMPT = "Count: 1, 2, 3,"
BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": LONG},
    "/v1/completions": {"prompt": PROMPT, "max_tokens": LONG},
    "/v1/messages": {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": LONG},
    "/v1/responses": {"input": PROMPT, "max_output_tokens": LONG},
}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    env = {"LIGHT_MODEL_PATH": "fake/light", "LIGHT_N_CTX": "8192", "LIGHT_MAX_QUEUE": "4"}
    with live_server(env, wait_for=("light",), engines=fake_engines(reply=counting, token_seconds=0.005)) as live:
        yield live


def in_flight(server: LiveServer) -> int:
    with server.client() as http:
        return int(http.get("/v1/models/light").json()["in_flight"])


def gone_after(server: LiveServer, path: str, body: dict[str, Any], seconds: float) -> None:
    """Send `body` and hang up after `seconds` without an answer (a non-streaming one is still
    being generated, a streaming one has not started)."""
    with httpx.Client(base_url=server.url, timeout=seconds) as http, pytest.raises(httpx.ReadTimeout):
        http.post(path, json={"model": "light", **body})


@pytest.mark.parametrize("path", sorted(BODIES))
def test_a_client_that_goes_away_frees_the_model(server: LiveServer, path: str) -> None:
    """Two non-streaming clients give up (one generating, one queued behind it): the model is free
    at once, not when 3,000 tokens are done, and serves the next client."""
    wait_until(lambda: in_flight(server) == 0)
    threads = [threading.Thread(target=gone_after, args=(server, path, BODIES[path], 1.0)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    wait_until(lambda: in_flight(server) == 0, seconds=10)
    with server.client() as http:  # and the model serves the next client
        res = http.post("/v1/completions", json={"model": "light", "prompt": PROMPT, "max_tokens": 3})
        assert res.status_code == 200 and res.json()["choices"][0]["text"] == "4,5"


@pytest.mark.parametrize("stream", [True, False])
def test_a_queued_request_whose_client_left_is_never_generated(server: LiveServer, stream: bool) -> None:
    """The client leaves while its request waits in the queue: it stops counting at once, and the
    model never starts it (streaming or not: a stream is not noticed only after its first token)."""
    wait_until(lambda: in_flight(server) == 0)
    body = {**BODIES["/v1/chat/completions"], "stream": stream}
    with held(server) as worker:  # the model is busy: the request waits in the queue
        processed = worker.processed
        gone_after(server, "/v1/chat/completions", body, 1.0)
        wait_until(lambda: worker.waiting == 0, seconds=10)
    wait_until(lambda: not worker.busy and in_flight(server) == 0, seconds=10)
    assert worker.processed == processed
