"""What one streamed request costs our own path, counted rather than timed (issue 28): the ASGI
messages of a streamed completion, on the fake engine, driven straight through the app."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any
from unittest import mock

import anyio.to_thread
import pytest
from litestar import Litestar

from tests.live import fake_app

BODY = b'{"model": "light", "prompt": "Say: hello", "max_tokens": 4, "stream": true, "temperature": 0.5}'
CHAT = BODY.replace(b'"prompt": "Say: hello"', b'"messages": [{"role": "user", "content": "hi"}]')


@pytest.fixture(scope="module")
def app() -> Iterator[Litestar]:
    with fake_app({"LIGHT_MODEL_PATH": "fake/light"}) as http:  # once the tier has loaded
        yield http.app  # type: ignore[misc]


async def _streamed(app: Litestar, path: str, body: bytes, log: list[str] | None = None) -> list[str]:
    """The app's ASGI sends and receives for one request, in order (into `log`, where other notes may
    go too); the client stays connected until the response ends (then a receive says
    `http.disconnect`, as uvicorn's does)."""
    log = [] if log is None else log
    ended = asyncio.Event()
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        log.append("receive")
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        await ended.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        kind = message["type"].removeprefix("http.response.")
        log.append(f"{kind}:{message.get('body', b'')[:7]!r}" if kind == "body" else kind)
        if kind == "body" and not message.get("more_body", False):
            ended.set()

    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    await asyncio.wait_for(app(scope, receive, send), 30)  # type: ignore[arg-type]
    return log


def test_the_first_event_goes_out_before_the_disconnect_listener_starts(app: Litestar) -> None:
    """Right after the headers comes the first token's event: Litestar's streaming task group (a task
    for the events, a listener for the client leaving) starts only after it, not before."""
    log = asyncio.run(_streamed(app, "/v1/completions", BODY))
    start = log.index("start")
    assert log[start + 1].startswith("body:b'data: {"), log
    assert log[-1] == "body:b''"


def test_a_streamed_request_makes_no_thread_pool_submission(app: Litestar) -> None:
    """No guard, dependency or hook of the request path runs on the loop's thread pool (a thread hop,
    ~0.2-1 ms on a busy machine, before the handler); the model's own threads are not the pool's."""
    with (
        mock.patch.object(asyncio.BaseEventLoop, "run_in_executor", autospec=True) as executor,
        mock.patch.object(anyio.to_thread, "run_sync", autospec=True) as run_sync,
    ):
        log = asyncio.run(_streamed(app, "/v1/chat/completions", CHAT))
    assert "start" in log and log[-1] == "body:b''"
    assert executor.call_count == 0 and run_sync.call_count == 0


def test_no_task_starts_before_the_response_but_the_disconnect_watch(app: Litestar) -> None:
    """A generating handler's dependencies (the serving object and the request's record) are resolved
    in the request's own task: Litestar's task group for them (a task each) cost ~0.2 ms before every
    handler. The tasks before the answer starts: the watch for a client that leaves, and its receive
    (and this test's own: Python 3.11's `wait_for` runs the app in a task)."""

    async def run() -> list[str]:
        log: list[str] = []

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            log.append(f"task:{coro.__qualname__}")
            return asyncio.Task(coro, loop=loop, **kwargs)

        asyncio.get_running_loop().set_task_factory(factory)  # type: ignore[arg-type]
        return await _streamed(app, "/v1/completions", BODY, log)

    log = asyncio.run(run())
    tasks = [note.removeprefix("task:") for note in log[: log.index("start")] if note.startswith("task:")]
    assert [t for t in tasks if t != "Litestar.__call__"] == ["_Watch.until_gone", "_streamed.<locals>.receive"], log


def test_a_request_body_is_decoded_once(app: Litestar) -> None:
    """Strictly, into the handler's type; that value is what the handler gets, not decoded a second
    time to dicts (Litestar's `decode_json`) and converted (~0.4 ms of an agent's 130 KB request)."""
    with mock.patch("litestar.connection.request.decode_json", autospec=True) as again:
        log = asyncio.run(_streamed(app, "/v1/chat/completions", CHAT))
    assert log[log.index("start") + 1].startswith("body:b'data: {"), log
    assert again.call_count == 0
