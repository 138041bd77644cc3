"""The server's HTTP/1.1 layer (service/http_protocol.py on httptools): every request h11 refused is
still refused, and what httptools alone gets wrong (an Upgrade request's body, chunked trailers) is
right. The same checks run on h11, uvicorn's other parser, which the expectations were taken from."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from service.__main__ import server_config
from service.http_protocol import _HeadHeld
from service.settings import parse_settings

HOST = b"Host: 127.0.0.1\r\n"
UPGRADE = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
LAST = b"GET /last HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"  # the server closes after answering it


class EchoApp:
    """Answers every request with what it received (path, header names, body size) and keeps a count."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.arrived = threading.Event()  # set as each request reaches the app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.paths.append(scope["path"])
        self.arrived.set()
        size, more = 0, True
        while more:
            message = await receive()
            size, more = size + len(message.get("body", b"")), message.get("more_body", False)
        names = [name.decode() for name, _ in scope["headers"]]
        body = json.dumps({"path": scope["path"], "headers": names, "body": size}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module", params=["ours", "h11"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[int, EchoApp]]:
    """A server with `server_config`'s settings (and its event loop) on the echo app; `h11`: the same
    with uvicorn's h11 protocol instead of ours."""
    app = EchoApp()
    overrides = {"http": "h11"} if request.param == "h11" else {}
    config = server_config(app, parse_settings({}), log_level="critical", **overrides)
    live = uvicorn.Server(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)  # connections wait in the backlog until the server accepts them

    def run() -> None:
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(live.serve(sockets=[sock]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        exchange(sock.getsockname()[1], LAST)  # answers once it has started
        yield sock.getsockname()[1], app
    finally:
        live.should_exit = True
        thread.join(10)
        sock.close()


def exchange(port: int, data: bytes, then: tuple[threading.Event, bytes] | None = None) -> list[tuple[int, bytes]]:
    """Sends `data` on one connection (and, once the event is set, `then`'s bytes) and reads until the
    server closes it: each response's status and body, in order."""
    raw = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(data)
        if then is not None:
            assert then[0].wait(30)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused while sending
                conn.sendall(then[1])
        with contextlib.suppress(ConnectionResetError):  # closed with bytes of ours unread: a reset
            while chunk := conn.recv(65536):
                raw += chunk
    answers = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields = dict(line.lower().split(b": ", 1) for line in lines[1:])
        size = int(fields.get(b"content-length", len(raw)))  # h11's 400 has none: the body runs to the close
        answers.append((int(lines[0].split()[1]), raw[:size]))
        raw = raw[size:]
    return answers


def echoed(answer: tuple[int, bytes]) -> dict[str, Any]:
    status, body = answer
    assert status == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


def chunked(body: bytes, trailers: bytes = b"") -> bytes:
    return b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n%s\r\n" % (len(body), body, trailers)


POST = b"POST /echo HTTP/1.1\r\n" + HOST
SMUGGLED = b"GET /smuggled HTTP/1.1\r\n" + HOST + b"\r\n"
HOSTILE = {
    "HTTP/1.1 without Host": b"GET /echo HTTP/1.1\r\n\r\n",
    "two Hosts, the second another's": POST + b"Host: evil.example\r\nContent-Length: 0\r\n\r\n",
    "Transfer-Encoding gzip, chunked": POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "Transfer-Encoding gzip": POST + b"Transfer-Encoding: gzip\r\n\r\n" + SMUGGLED,
    "Transfer-Encoding twice": POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "space before the colon": POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "HTTP/0.9": b"GET /echo\r\n\r\n",
    "two Content-Lengths": POST + b"Content-Length: 1\r\nContent-Length: 5\r\n\r\nabcde",
    "Content-Length +5": POST + b"Content-Length: +5\r\n\r\nabcde",
    "Content-Length past 2**64": POST + b"Content-Length: 99999999999999999999999\r\n\r\n",
    "NUL in a value": b"GET /echo HTTP/1.1\r\n" + HOST + b"X-A: a\x00b\r\n\r\n",
    "CR in a value": b"GET /echo HTTP/1.1\r\n" + HOST + b"X-A: a\rb\r\n\r\n",
    "bad byte in a name": b"GET /echo HTTP/1.1\r\n" + HOST + b"X(A: b\r\n\r\n",
    "line without a colon": b"GET /echo HTTP/1.1\r\n" + HOST + b"X-A\r\n\r\n",
    "space in the target": b"GET /ec ho HTTP/1.1\r\n" + HOST + b"\r\n",
    "control byte in the target": b"GET /echo\x01 HTTP/1.1\r\n" + HOST + b"\r\n",
    "TLS to the plain port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
    # Never ends: refused once 16 KiB are in, not buffered for ever (nor copied on every read).
    "head past 16 KiB": b"GET /echo HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 20_000,
}


@pytest.mark.parametrize("request_bytes", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_requests_are_refused_before_the_app(server: tuple[int, EchoApp], request_bytes: bytes) -> None:
    port, app = server
    before = len(app.paths)
    answers = exchange(port, request_bytes)  # the server closes the connection after its answer
    assert [status for status, _ in answers] == [400]
    assert app.paths[before:] == []  # nothing reached the app, nor a request smuggled behind it


@pytest.mark.parametrize(
    "endless", [b"3;ext=" + b"e" * 100_000, b"0\r\nX-Trailer: " + b"t" * 100_000], ids=["chunk extension", "trailer"]
)
def test_an_endless_chunk_line_or_trailer_is_refused(server: tuple[int, EchoApp], endless: bytes) -> None:
    """Never ends: the server stops reading it and closes the connection (with a 400 unless the
    close reset it first), as for an endless head. Sent once the request has reached the app."""
    port, app = server
    app.arrived.clear()
    answers = exchange(port, POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", then=(app.arrived, endless))
    assert [status for status, _ in answers] in ([400], [])


def test_a_malformed_chunk_ends_the_connection(server: tuple[int, EchoApp]) -> None:
    """The request had reached the app (its head was fine); what follows the bad chunk never does."""
    port, app = server
    before = len(app.paths)
    answers = exchange(port, POST + chunked(b"abc").replace(b"abc\r\n", b"abcXX") + SMUGGLED)
    assert answers[-1][0] == 400
    assert app.paths[before:] == ["/echo"]


def test_large_heads_and_bodies_within_bounds_pass(server: tuple[int, EchoApp]) -> None:
    port, _ = server
    body = b"x" * (1 << 20)  # counted as body, not head, on every read
    head = POST + b"X-Cookie: " + b"c" * 8_000 + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
    answers = exchange(port, head + body + POST + chunked(b"abc") + LAST)
    assert echoed(answers[0])["body"] == len(body)
    assert echoed(answers[1])["body"] == 3
    assert echoed(answers[2])["path"] == "/last"


def test_chunked_trailers_stay_out_of_the_headers(server: tuple[int, EchoApp]) -> None:
    """The app (and the Host check before it) read the headers before the body's trailers arrive."""
    port, _ = server
    answers = exchange(port, POST + chunked(b"abc", b"Host: evil.example\r\nX-Trailer: 1\r\n") + LAST)
    seen = echoed(answers[0])
    assert seen["body"] == 3
    assert seen["headers"].count("host") == 1 and "x-trailer" not in seen["headers"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_upgrade_we_do_not_speak_is_ignored_and_the_body_kept(server: tuple[int, EchoApp], framing: str) -> None:
    """`curl --http2 http://...` and every JDK HttpClient ask for h2c; the request is answered over
    HTTP/1.1 with its body, and the connection goes on serving."""
    port, _ = server
    body = b'{"prompt": "hi"}'
    framed = b"Content-Length: %d\r\n\r\n%s" % (len(body), body) if framing == "content-length" else chunked(body)
    answers = exchange(port, POST + UPGRADE + framed + LAST)
    assert echoed(answers[0])["body"] == len(body)
    assert echoed(answers[1])["path"] == "/last"


def test_an_upgrade_pipelined_behind_a_response_waits_for_it(server: tuple[int, EchoApp]) -> None:
    port, _ = server
    first = b"GET /first HTTP/1.1\r\n" + HOST + b"\r\n"
    answers = exchange(port, first + POST + UPGRADE + chunked(b"abcd") + LAST)
    assert [echoed(a)["path"] for a in answers] == ["/first", "/echo", "/last"]
    assert echoed(answers[1])["body"] == 4


class _Recorded:
    """A transport that keeps what is written to it, each write apart."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


def test_a_response_head_leaves_with_the_first_body_bytes() -> None:
    async def run() -> list[list[bytes]]:
        loop = asyncio.get_running_loop()
        seen = []
        for writes in ([b"HTTP/1.1 200 OK\r\n\r\n", b"5\r\ndata:\r\n"], [b"HTTP/1.1 200 OK\r\n\r\n"]):
            real = _Recorded()
            held = _HeadHeld(real, loop)  # type: ignore[arg-type]
            for data in writes:
                held.write(data)
            assert held.get_write_buffer_size() == (0 if len(writes) > 1 else len(writes[0]))
            await asyncio.sleep(0)  # the end of this step of the loop: a head alone goes out then
            held.write(b"0\r\n\r\n")
            seen.append(real.writes)
        real = _Recorded()
        held = _HeadHeld(real, loop)  # type: ignore[arg-type]
        held.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        held.close()  # a refusal: written, then closed
        seen.append([*real.writes, b"closed" if real.closed else b""])
        return seen

    together, alone, refused = asyncio.run(run())
    assert together == [b"HTTP/1.1 200 OK\r\n\r\n5\r\ndata:\r\n", b"0\r\n\r\n"]
    assert alone == [b"HTTP/1.1 200 OK\r\n\r\n", b"0\r\n\r\n"]
    assert refused == [b"HTTP/1.1 400 Bad Request\r\n\r\n", b"closed"]
