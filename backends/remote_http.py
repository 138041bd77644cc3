"""The remote pool's HTTP/1.1 transport to plain-`http://` upstreams: kept-alive connections on
asyncio streams, under httpx's own API (its Request, Response and errors), so the pool's code reads
one client whatever the scheme. httpcore's pool cost ~1.5 ms a streamed request more than this on
a 2-vCPU box (docs/benchmarks.md, issue 28's hop); `https://` upstreams and a proxy in the environment
keep httpx's default transport (TLS, certificates and proxies stay its job).

The upstream is one the operator named, yet what it answers is parsed strictly and within bounds:
header blocks up to 64 KiB, bodies read in pieces of at most 64 KiB whatever length they announce,
every read under the request's read timeout, and a connection goes back to the idle list only
when its answer was read to the end and the upstream did not ask to close it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx

_LIMIT = 64 * 1024  # bytes: a header block, a chunk-size line, one piece of a body
_NO_BODY = frozenset({204, 304})
_FORBIDDEN = (b"\r", b"\n", b"\0")  # in a header we send: a request split in two


class _Stale(Exception):
    """The connection ended before any byte of the answer: the upstream never read the request."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def reusable(self) -> bool:
        """Still open and silent: a kept-alive connection the upstream closed (or wrote to
        unasked) since its last answer is dropped before a request is sent on it."""
        unread = getattr(self.reader, "_buffer", b"")  # asyncio keeps what arrived unread there
        return not self.writer.is_closing() and not self.reader.at_eof() and not unread

    def close(self) -> None:
        self.writer.close()


class PlainTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over TCP with kept-alive connections per host and port, at most `max_idle` idle
    ones for each (each request takes the most recently used, which is the least likely closed).

    A request that leaves no idle connection behind has the next one connected while it is
    answered: llama-server closes every streamed answer's connection, and connecting cost its next
    request ~0.3 ms here (more with a name to resolve)."""

    def __init__(self, max_idle: int) -> None:
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._connecting: dict[tuple[str, int], asyncio.Task[None]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"PlainTransport speaks http:// only, not {url.scheme}://")
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        origin = (url.host, url.port or 80)
        head = _request_head(request, await request.aread())
        reused = self._take(origin)
        if reused is not None:
            try:
                return await self._exchange(reused, request, head, origin, timeouts)
            except _Stale:
                pass  # a kept-alive connection the upstream closed as it was reused: nothing was answered
        connection = await _connect(origin, timeouts.get("connect"))
        try:
            return await self._exchange(connection, request, head, origin, timeouts)
        except _Stale as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from None

    async def _exchange(
        self,
        connection: _Connection,
        request: httpx.Request,
        head: bytes,
        origin: tuple[str, int],
        timeouts: dict[str, float | None],
    ) -> httpx.Response:
        """Send the request on `connection` and read the answer's head; `_Stale` when the connection
        ended before a byte of the answer came (the request may be sent again on another one)."""
        if not self._idle.get(origin) and origin not in self._connecting:
            self._connecting[origin] = asyncio.create_task(self._spare(origin, timeouts.get("connect")))
        try:
            try:
                connection.writer.write(head)
                async with _errors(request, timeouts.get("write"), httpx.WriteTimeout, httpx.WriteError):
                    await connection.writer.drain()
            except httpx.WriteError as exc:
                raise _Stale(str(exc)) from None
            async with _errors(request, timeouts.get("read"), httpx.ReadTimeout, httpx.ReadError):
                status, reason, headers = await _read_head(connection.reader, request)
        except BaseException:
            connection.close()
            raise
        body = _Body(self, origin, connection, request, status, headers, timeouts.get("read"))
        extensions = {"http_version": b"HTTP/1.1", "reason_phrase": reason}
        return httpx.Response(status, headers=headers, stream=body, request=request, extensions=extensions)

    async def aclose(self) -> None:
        for task in self._connecting.values():
            task.cancel()
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    def _take(self, origin: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.reusable():
                return connection
            connection.close()
        return None

    async def _spare(self, origin: tuple[str, int], seconds: float | None) -> None:
        try:
            self._give_back(origin, await _connect(origin, seconds))
        except httpx.TransportError:
            pass  # the next request connects itself and meets the failure
        finally:
            del self._connecting[origin]

    def _give_back(self, origin: tuple[str, int], connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) < self.max_idle and connection.reusable():
            idle.append(connection)
        else:
            connection.close()


class _Body(httpx.AsyncByteStream):
    """An answer's body as its framing says (chunked, Content-Length, or up to the close)."""

    def __init__(
        self,
        transport: PlainTransport,
        origin: tuple[str, int],
        connection: _Connection,
        request: httpx.Request,
        status: int,
        headers: list[tuple[bytes, bytes]],
        timeout: float | None,
    ) -> None:
        self._transport, self._origin, self._connection = transport, origin, connection
        self._request, self._timeout = request, timeout
        self._done = False
        self._length: int | None = None
        self._chunked = False
        self._keep_alive = True
        encodings: list[bytes] = []
        lengths: set[bytes] = set()
        for name, value in headers:
            name = name.lower()
            if name == b"transfer-encoding":
                encodings += [v.strip().lower() for v in value.split(b",")]
            elif name == b"content-length":
                lengths |= {v.strip() for v in value.split(b",")}
            elif name == b"connection" and b"close" in (v.strip().lower() for v in value.split(b",")):
                self._keep_alive = False
        if request.method == "HEAD" or status in _NO_BODY:
            self._length = 0
        elif encodings:
            # RFC 9112 6.3: Transfer-Encoding wins over Content-Length; a body not ending in
            # chunked runs to the close (and a connection that carried both is not reused).
            self._chunked = encodings[-1] == b"chunked"
            self._keep_alive = self._keep_alive and self._chunked and not lengths
        elif lengths:
            if len(lengths) != 1 or not (length := lengths.pop()).isdigit():
                connection.close()
                raise httpx.RemoteProtocolError("the upstream answered an invalid Content-Length", request=request)
            self._length = int(length)
        else:
            self._keep_alive = False  # up to the close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reader = self._connection.reader
        pieces = self._pieces(reader)
        while True:
            async with _errors(self._request, self._timeout, httpx.ReadTimeout, httpx.ReadError):
                piece = await anext(pieces, None)
            if piece is None:
                break
            yield piece
        self._done = True

    async def _pieces(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        if self._chunked:
            while size := _chunk_size(await reader.readuntil(b"\r\n"), self._request):
                while size:
                    piece = await reader.readexactly(min(size, _LIMIT))
                    size -= len(piece)
                    yield piece
                if await reader.readexactly(2) != b"\r\n":
                    raise httpx.RemoteProtocolError("a chunk longer than its size", request=self._request)
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, if any: not read
                pass
        elif self._length is not None:
            left = self._length
            while left:
                piece = await reader.read(min(left, _LIMIT))
                if not piece:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(piece)
                yield piece
        else:
            while piece := await reader.read(_LIMIT):
                yield piece

    async def aclose(self) -> None:
        if self._done and self._keep_alive:
            self._transport._give_back(self._origin, self._connection)
        else:  # unread bytes would be the next answer's start
            self._connection.close()


async def _connect(origin: tuple[str, int], seconds: float | None) -> _Connection:
    try:
        async with asyncio.timeout(seconds):
            reader, writer = await asyncio.open_connection(*origin, limit=_LIMIT)
    except TimeoutError:
        raise httpx.ConnectTimeout(f"no connection to {origin[0]}:{origin[1]} within {seconds:g} s") from None
    except OSError as exc:
        raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
    return _Connection(reader, writer)


def _request_head(request: httpx.Request, content: bytes) -> bytes:
    """The request line, headers and body: httpx's Request set Host and Content-Length already."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)]
    chunked = False
    for name, value in request.headers.raw:
        if any(c in name or c in value for c in _FORBIDDEN):
            raise httpx.LocalProtocolError(f"header {name!r} holds a line break or NUL", request=request)
        chunked = chunked or (name.lower() == b"transfer-encoding" and value.lower() == b"chunked")
        lines.append(name + b": " + value)
    if chunked:  # a streamed body of unknown length, read whole above: one chunk, then the last
        content = b"%x\r\n%s\r\n0\r\n\r\n" % (len(content), content) if content else b"0\r\n\r\n"
    return b"\r\n".join(lines) + b"\r\n\r\n" + content


async def _read_head(
    reader: asyncio.StreamReader, request: httpx.Request
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Status, reason and headers of the final answer (interim 1xx answers skipped)."""
    interim = False
    while True:
        try:
            block = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial and not interim:
                raise _Stale("Server disconnected without sending a response.") from None
            raise httpx.RemoteProtocolError("a cut answer head", request=request) from None
        except ConnectionResetError:
            if interim:
                raise
            raise _Stale("Server reset the connection without sending a response.") from None
        except asyncio.LimitOverrunError:
            raise httpx.RemoteProtocolError("a header block over 64 KiB", request=request) from None
        status_line, *fields = block[:-4].split(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise httpx.RemoteProtocolError(f"not an HTTP/1.1 status line: {status_line[:80]!r}", request=request)
        headers = []
        for field in fields:
            name, colon, value = field.partition(b":")
            if not colon or not name or name != name.strip() or field[:1] in (b" ", b"\t"):
                raise httpx.RemoteProtocolError(f"a malformed header line: {field[:80]!r}", request=request)
            headers.append((name, value.strip(b" \t")))
        status = int(code)
        if not 100 <= status < 200:
            if version == b"HTTP/1.0":
                headers.append((b"connection", b"close"))  # kept alive only when asked: not reused
            return status, reason, headers
        if status == 101:
            raise httpx.RemoteProtocolError("the upstream switched protocols", request=request)
        interim = True


def _chunk_size(line: bytes, request: httpx.Request) -> int:
    size = line[:-2].partition(b";")[0].strip()  # chunk extensions are ignored
    if not size or len(size) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size):
        raise httpx.RemoteProtocolError(f"a malformed chunk size: {line[:40]!r}", request=request)
    return int(size, 16)


@contextlib.asynccontextmanager
async def _errors(
    request: httpx.Request,
    seconds: float | None,
    on_timeout: type[httpx.TimeoutException],
    on_error: type[httpx.NetworkError],
) -> AsyncIterator[None]:
    """Bounds what it wraps by `seconds` and turns the stream's failures into httpx's errors."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise on_timeout(f"nothing within {seconds:g} s", request=request) from None
    except asyncio.IncompleteReadError:
        raise httpx.RemoteProtocolError("the upstream closed the connection mid-answer", request=request) from None
    except asyncio.LimitOverrunError:
        raise httpx.RemoteProtocolError("a line over 64 KiB where a chunk size was due", request=request) from None
    except (OSError, ValueError) as exc:  # reset, broken pipe; StreamReader's ValueError on a too long line
        raise on_error(str(exc) or type(exc).__name__, request=request) from None
