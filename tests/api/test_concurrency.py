"""One worker per model: a bounded queue, arrival order, and streams that are never interrupted."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.live import LiveServer, live_server


@pytest.fixture(scope="module")
def server(gemma_gguf: str) -> Iterator[LiveServer]:
    # MAX_BATCH=1: one request at a time, so the queue and its order are what these tests see.
    env = {
        "LIGHT_MODEL_PATH": gemma_gguf,
        "LIGHT_N_CTX": "1024",
        "LIGHT_MAX_QUEUE": "1",
        "LIGHT_MAX_BATCH": "1",
        "LIGHT_TEMPERATURE": "0",
    }
    with live_server(env, wait_for=("light",)) as live:
        yield live


def wait_until(predicate: object, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_full_queue_answers_429_with_retry_after(server: LiveServer) -> None:
    worker = server.app.state.registry.slots["light"].worker
    results: dict[str, int] = {}
    stream_body = {"model": "light", "prompt": "Count:", "max_tokens": 300, "stream": True}
    with server.client() as http, http.stream("POST", "/v1/completions", json=stream_body) as running:
        lines = running.iter_lines()
        next(lines)  # the worker is now busy with this stream

        def queued() -> None:
            with server.client() as other:
                body = {"model": "light", "prompt": "Hi", "max_tokens": 2}
                results["queued"] = other.post("/v1/completions", json=body).status_code

        waiter = threading.Thread(target=queued)
        waiter.start()
        wait_until(lambda: worker.waiting == 1)
        rejected = http.post(
            "/v1/chat/completions", json={"model": "light", "messages": [{"role": "user", "content": "x"}]}
        )
        assert rejected.status_code == 429
        assert int(rejected.headers["Retry-After"]) >= 1
        error = rejected.json()["error"]
        assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
        # The running stream was not disturbed by the rejected or the queued request.
        chunks = [line for line in lines if line.startswith("data: ")]
        assert chunks[-1] == "data: [DONE]" and len(chunks) > 50
    waiter.join(60)
    assert results["queued"] == 200


def test_requests_are_served_in_arrival_order(server: LiveServer) -> None:
    worker = server.app.state.registry.slots["light"].worker
    order: list[int] = []
    lock = threading.Lock()

    def run(i: int, body: dict[str, object]) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            res = http.post("/v1/completions", json=body)
            assert res.status_code == 200
            with lock:
                order.append(i)

    first = threading.Thread(target=run, args=(0, {"model": "light", "prompt": "Count:", "max_tokens": 60}))
    first.start()
    wait_until(lambda: worker.busy)
    second = threading.Thread(target=run, args=(1, {"model": "light", "prompt": "Hi", "max_tokens": 1}))
    second.start()
    first.join(60)
    second.join(60)
    # The short request arrived second and waited: it never jumps the queue.
    assert order == [0, 1]
