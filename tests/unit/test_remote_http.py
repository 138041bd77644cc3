"""The remote pool's own HTTP/1.1 transport (backends/remote_http.py) against a scripted upstream:
framing, connection reuse, and what a broken or hostile upstream answers."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from backends.remote import RemotePool
from backends.remote_http import PlainTransport
from kernel.config import TierSettings


def synchronous(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Each test on an event loop of its own, bounded in time."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=20))

    return run


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


CLOSE = b""  # as the last piece of an answer: the upstream closes the connection after it


class Upstream:
    """A server that answers each request with the next of `answers` (bytes written in the pieces
    given, with a pause between so they arrive as separate reads); `None` closes the connection
    unanswered. Out of answers, it keeps the connection open and silent."""

    def __init__(self, answers: list[list[bytes] | None]) -> None:
        self.answers = answers
        self.served: list[int] = []  # requests read on each connection, in the order they opened
        self.requests: list[bytes] = []
        self.port = 0
        self.changed = asyncio.Condition()

    async def connected(self, count: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.served) >= count)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self.changed:
            index = len(self.served)
            self.served.append(0)
            self.changed.notify_all()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(v) for k, _, v in _fields(head) if k == b"content-length"), 0)
                self.requests.append(head + await reader.readexactly(length))
                self.served[index] += 1
                answer = self.answers.pop(0) if self.answers else []
                if answer is None:
                    break
                for piece in answer:
                    if piece is CLOSE:
                        return
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.001)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _fields(head: bytes) -> list[tuple[bytes, bytes, bytes]]:
    return [(k.strip().lower(), c, v.strip()) for k, c, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])]


@asynccontextmanager
async def serving(answers: list[list[bytes] | None]) -> AsyncIterator[tuple[Upstream, PlainTransport]]:
    upstream = Upstream(answers)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    transport = PlainTransport(max_idle=4)
    try:
        yield upstream, transport
    finally:
        await transport.aclose()
        server.close()


async def post(upstream: Upstream, transport: PlainTransport, *, read: float = 5.0, **headers: str) -> httpx.Response:
    request = httpx.Request(
        "POST",
        f"http://127.0.0.1:{upstream.port}/v1/completions",
        json={"prompt": "hi"},
        headers=headers,
        extensions={"timeout": {"connect": 5.0, "read": read, "write": 5.0, "pool": 5.0}},
    )
    return await transport.handle_async_request(request)


async def lines(response: httpx.Response) -> list[str]:
    try:
        return [line async for line in response.aiter_lines() if line]
    finally:
        await response.aclose()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@synchronous
async def test_chunked_events_split_anywhere_arrive_whole_and_the_connection_is_kept() -> None:
    events = chunk(b'data: {"a": 1}\n\n') + chunk(b"data: [DO") + chunk(b"NE]\n\n") + b"0\r\n\r\n"
    split = [SSE_HEAD[:20], SSE_HEAD[20:] + events[:7], events[7:30], events[30:]]
    async with serving([split, [SSE_HEAD + events]]) as (upstream, transport):
        first = await post(upstream, transport)
        assert first.status_code == 200 and first.headers["content-type"] == "text/event-stream"
        assert await lines(first) == ['data: {"a": 1}', "data: [DONE]"]
        assert await lines(await post(upstream, transport)) == ['data: {"a": 1}', "data: [DONE]"]
        assert upstream.served[0] == 2
        request = upstream.requests[0]
        assert request.startswith(b"POST /v1/completions HTTP/1.1\r\n")
        assert b"Host: 127.0.0.1:%d\r\n" % upstream.port in request and request.endswith(b'{"prompt":"hi"}')


@synchronous
async def test_content_length_bodies_keep_the_connection_and_trailers_are_read_past() -> None:
    whole = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 13\r\n\r\n" + b'{"error":"x"}'
    trailer = SSE_HEAD + chunk(b"data: 1\n\n") + b"0\r\nX-Checksum: 1\r\n\r\n"
    async with serving([[whole], [trailer], [whole]]) as (upstream, transport):
        answer = await post(upstream, transport)
        assert answer.status_code == 400 and (await answer.aread()) == b'{"error":"x"}'
        await answer.aclose()
        assert await lines(await post(upstream, transport)) == ["data: 1"]
        assert (await post(upstream, transport)).status_code == 400
        assert upstream.served[0] == 3


@pytest.mark.parametrize(
    "answer",
    [
        [b"HTTP/1.1 200 OK\r\n\r\nbody up to the close", CLOSE],  # no framing: read to the close
        [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbody"],
        [b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nbody"],
        # both framings (a smuggling shape): chunked wins, and the connection is not trusted again
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n4\r\nbody\r\n0\r\n\r\n"],
    ],
)
@synchronous
async def test_answers_that_end_the_connection_are_not_reused(answer: list[bytes]) -> None:
    async with serving([answer, answer]) as (upstream, transport):
        response = await post(upstream, transport)
        assert (await response.aread()).startswith(b"body")
        await response.aclose()
        response = await post(upstream, transport)
        assert (await response.aread()).startswith(b"body")
        assert sorted(upstream.served, reverse=True)[:2] == [1, 1]  # none served both


@synchronous
async def test_an_idle_connection_the_upstream_closed_is_not_sent_on() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    # the upstream closes its side once the connection idles (llama-server after 5 s)
    async with serving([[ok, CLOSE], [ok]]) as (upstream, transport):
        answer = await post(upstream, transport)
        await answer.aread()
        await answer.aclose()
        await asyncio.sleep(0.1)
        assert (await (await post(upstream, transport)).aread()) == b"ok"
        assert sorted(upstream.served, reverse=True)[:2] == [1, 1]


@synchronous
async def test_a_kept_alive_connection_closed_as_it_is_reused_costs_no_error() -> None:
    """The upstream closes an idle connection just as a request goes out on it (llama-server after
    5 s idle; the pool's health check came every 5 s, and such a race ejected a healthy upstream):
    nothing was answered, so the request goes again on a fresh connection."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with serving([[ok], None, [ok]]) as (upstream, transport):
        for _ in range(2):
            answer = await post(upstream, transport)
            assert await answer.aread() == b"ok"
            await answer.aclose()
        assert upstream.served[0] == 2  # the second request was read on the first connection, unanswered


@synchronous
async def test_a_stream_closed_before_its_end_takes_its_connection_with_it() -> None:
    events = SSE_HEAD + chunk(b"data: 1\n\n") + chunk(b"data: 2\n\n") + b"0\r\n\r\n"
    async with serving([[events], [events]]) as (upstream, transport):
        response = await post(upstream, transport)
        async for line in response.aiter_lines():
            assert line == "data: 1"
            break
        await response.aclose()
        assert await lines(await post(upstream, transport)) == ["data: 1", "data: 2"]
        assert sorted(upstream.served, reverse=True)[:2] == [1, 1]


@synchronous
async def test_the_next_connection_is_ready_when_the_upstream_closes_each_one() -> None:
    events = [SSE_HEAD + chunk(b"data: 1\n\n") + b"0\r\n\r\n", CLOSE]  # as llama-server streams
    async with serving([events, events]) as (upstream, transport):
        assert await lines(await post(upstream, transport)) == ["data: 1"]
        await upstream.connected(2)  # while the first was answered
        assert await lines(await post(upstream, transport)) == ["data: 1"]
        assert upstream.served[:2] == [1, 1]


@synchronous
async def test_interim_answers_are_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with serving([[answer]]) as (upstream, transport):
        response = await post(upstream, transport)
        assert response.status_code == 200 and await response.aread() == b"ok"


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ([b"SSH-2.0-OpenSSH_9\r\n\r\n"], "status line"),
        ([b"HTTP/1.1 2000 OK\r\n\r\n"], "status line"),
        ([b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"], "malformed header"),
        ([b"HTTP/1.1 200 OK\r\n folded: value\r\n\r\n"], "malformed header"),
        ([b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"], "over 64 KiB"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"], "Content-Length"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"], "Content-Length"),
        (None, "without sending a response"),
    ],
)
@synchronous
async def test_a_broken_answer_head_is_a_protocol_error(answer: list[bytes] | None, error: str) -> None:
    async with serving([answer]) as (upstream, transport):
        with pytest.raises(httpx.RemoteProtocolError, match=error):
            await post(upstream, transport)


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\ndata\r\n",  # not a hex size
        chunk(b"data: 1\n\n")[:-2] + b"XX0\r\n\r\n",  # a chunk longer than its size
        b"4\r\nda",  # cut mid-chunk
        b"ffffffff\r\n" + b"a" * 200_000,  # announces 4 GiB, then the connection ends
    ],
)
@synchronous
async def test_a_broken_chunked_body_is_a_protocol_error(body: bytes) -> None:
    async with serving([[SSE_HEAD + body, CLOSE]]) as (upstream, transport):
        response = await post(upstream, transport)
        with pytest.raises(httpx.RemoteProtocolError):
            await response.aread()
        await response.aclose()


@synchronous
async def test_a_huge_announced_chunk_is_read_in_bounded_pieces() -> None:
    size = 1_000_000
    async with serving([[SSE_HEAD, b"%x\r\n" % size, b"a" * size, b"\r\n0\r\n\r\n"]]) as (upstream, transport):
        response = await post(upstream, transport)
        pieces = [piece async for piece in response.aiter_raw()]
        assert sum(map(len, pieces)) == size and max(map(len, pieces)) <= 64 * 1024


@synchronous
async def test_a_stalled_upstream_times_out_between_chunks() -> None:
    async with serving([[SSE_HEAD + chunk(b"data: 1\n\n")]]) as (upstream, transport):
        response = await post(upstream, transport, read=0.2)
        received = []
        with pytest.raises(httpx.ReadTimeout):
            async for line in response.aiter_lines():
                received.append(line)
        assert received == ["data: 1", ""]


@synchronous
async def test_no_answer_head_in_time_is_a_read_timeout() -> None:
    async with serving([[]]) as (upstream, transport):
        with pytest.raises(httpx.ReadTimeout):
            await post(upstream, transport, read=0.2)


@synchronous
async def test_a_refused_connection_is_a_connect_error() -> None:
    async with serving([]) as (upstream, transport):
        pass
    with pytest.raises(httpx.ConnectError):
        await post(upstream, transport)


@synchronous
async def test_a_header_value_cannot_split_the_request() -> None:
    async with serving([[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]]) as (upstream, transport):
        with pytest.raises(httpx.LocalProtocolError):
            await post(upstream, transport, **{"anthropic-beta": "x\r\nX-Injected: 1"})
        assert upstream.requests == []


@synchronous
async def test_https_is_not_its_job() -> None:
    transport = PlainTransport(max_idle=1)
    with pytest.raises(httpx.UnsupportedProtocol):
        await transport.handle_async_request(httpx.Request("GET", "https://127.0.0.1:1/"))


@pytest.mark.parametrize(("proxy", "plain"), [(None, True), ("http://proxy.internal:3128", False)])
def test_the_pool_leaves_proxied_upstreams_to_httpx(
    monkeypatch: pytest.MonkeyPatch, proxy: str | None, plain: bool
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    if proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy)

    async def started() -> RemotePool:
        pool = RemotePool(TierSettings(name="heavy", remote_urls="http://10.0.0.1:8000/v1"))
        pool._ensure_started()
        await pool.stop()
        return pool

    pool = asyncio.run(started())
    assert (pool._plain is not None) is plain
