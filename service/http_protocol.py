"""The HTTP/1.1 protocol the server runs: uvicorn's httptools (llhttp, C) protocol, refusing what h11 refused.

httptools parses a request in a fraction of h11's time, and is stricter about most malformed input
(obsolete line folding, control bytes in values, Content-Length lists, Content-Length beside
Transfer-Encoding, bare LF). Where it is looser than h11 this class restores h11's answer, a 400
that closes the connection:
- a request head, chunk size line or trailer section that does not end within
  `h11_max_incomplete_event_size` bytes (twice that at most; httptools has no limit, and copies a
  growing header value on every read);
- HTTP/1.1 without a `Host`, or two of them (the security layer reads the first: DNS rebinding);
- a `Transfer-Encoding` other than plain `chunked` (`gzip, chunked`);
- any version but HTTP/1.0 and 1.1 (HTTP/0.9's bare request line).
Chunked trailers are dropped, as h11 drops them (uvicorn would add them to the headers the app
already checked). A request asking to upgrade to anything but a WebSocket (`Upgrade: h2c`, sent
by `curl --http2` and every JDK HttpClient) loses its body in httptools, which stops at the head
(uvicorn issue 2722): the server may ignore an Upgrade (RFC 9110 7.8), so the connection carries
on with uvicorn's h11 protocol from that request's head on.
A response's head is held until its body's first bytes (`_HeadHeld`): one write for both.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import httptools
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_INVALID = "Invalid HTTP request received."


class _Refused(Exception):
    """Raised inside a parser callback: httptools turns it into an HttpParserError, so a 400."""


class _HeadHeld:
    """The connection's transport, holding a response's head (uvicorn writes it the moment the app
    starts its answer) until the body's first bytes or the end of this step of the loop, so that
    both leave in one write: one segment and one wake-up of the client, ~0.1-0.3 ms sooner to a
    streamed answer's first token (docs/benchmarks.md). Everything else passes straight through."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head = b""

    def write(self, data: bytes) -> None:
        if self._head:
            data, self._head = self._head + data, b""
        elif data.startswith(b"HTTP/1."):
            self._head = data
            self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        head, self._head = self._head, b""
        if head and not self._transport.is_closing():
            self._transport.write(head)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._head)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CheckedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_stall = self.config.h11_max_incomplete_event_size or 16 * 1024
        self._stalled = 0  # bytes received since the parser last finished something (see _progress)
        self._in_head = True  # reading a request head, not a chunked body's trailers
        self._hosts = 0
        self._to_h11: bytes | None = None  # the head of a request h11 will take over, once rebuilt

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, _HeadHeld(transport, self.loop)))

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._to_h11 is not None:  # waiting to hand over: h11 parses whatever follows
            self._to_h11 += data
            self.flow.pause_reading()
            return
        # Fed in slices of at most the limit: the bytes after the last progress in a slice go
        # uncounted, so what stalls is refused within twice the limit, however the reads fall.
        view = memoryview(data)
        for start in range(0, len(data), self._max_stall):
            piece = view[start : start + self._max_stall]
            self._stalled += len(piece)
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserError:
                self._refuse()
                return
            except httptools.HttpParserUpgrade as upgrade:
                if self._to_h11 is None:
                    self.handle_websocket_upgrade()
                else:
                    self._to_h11 += data[start + upgrade.args[0] :]
                    if self.cycle is None or self.cycle.response_complete:
                        self._switch_to_h11()
                    else:  # pipelined behind a response still being written: after it
                        self.flow.pause_reading()
                return
            if self._stalled > self._max_stall:
                self._refuse()
                return

    def _progress(self) -> None:
        """A head, a chunk's size line, body bytes or a message finished: what came before is parsed.
        Bytes that finish nothing (an endless header, chunk extension or trailer) are refused past
        the limit, as h11 refuses an event it cannot complete within it."""
        self._stalled = 0

    def _refuse(self) -> None:
        self.logger.warning(_INVALID)
        self.send_400_response(_INVALID)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._hosts = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:  # a chunked body's trailers
            return
        super().on_header(name, value)
        name = self.headers[-1][0]  # lower-cased
        if name == b"host":
            self._hosts += 1
            if self._hosts > 1:
                raise _Refused("two Host headers")
        elif name == b"transfer-encoding" and value.strip().lower() != b"chunked":
            raise _Refused("a Transfer-Encoding other than chunked")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._progress()
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1") or (version == "1.1" and not self._hosts):
            raise _Refused(f"HTTP/{version} with {self._hosts} Host headers")
        if self.parser.should_upgrade() and not self._should_upgrade():
            method = self.parser.get_method()
            lines = [b"%s %s HTTP/%s\r\n" % (method, self.url, version.encode())]
            lines += [b"%s: %s\r\n" % header for header in self.headers]
            self._to_h11 = b"".join(lines) + b"\r\n"
            return
        super().on_headers_complete()

    def on_chunk_header(self) -> None:
        self._progress()

    def on_body(self, body: bytes) -> None:
        self._progress()
        if self._to_h11 is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        self._progress()
        if self._to_h11 is None:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._to_h11 is not None and self.cycle.response_complete and not self.transport.is_closing():
            self._switch_to_h11()

    def _switch_to_h11(self) -> None:
        data, self._to_h11 = self._to_h11 or b"", None
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        self.connections.discard(self)
        protocol = H11Protocol(config=self.config, server_state=self.server_state, app_state=self.app_state)
        protocol.connection_made(self.transport)
        self.transport.set_protocol(protocol)
        protocol.data_received(data)
