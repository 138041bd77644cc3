"""`/v1/ws`: chat and legacy completions over one WebSocket, several at once, each by a client id
(the route is service/controllers/ws.py; the protocol is served here).

Client → server (JSON text or binary messages; unknown fields are refused):
    {"type": "auth", "api_key": "sk-..."}                  first, when keys are on and no header sent it;
                                                           later, to change key (a bad one closes)
    {"type": "chat.completions", "id": "a", "body": {...}} a /v1/chat/completions body (stream or not)
    {"type": "completions", "id": "b", "body": {...}}      a /v1/completions body
    {"type": "cancel", "id": "a"}                          stop that request's generation
    {"type": "ping", "data": <any>}                        answered by {"type": "pong", "data": <same>}
Server → client:
    {"type": "authenticated"}                              after a good auth message
    {"type": "chunk", "id": "a", "data": <chunk>}          each SSE event the HTTP stream would send
    {"type": "response", "id": "a", "data": <completion>}  the whole answer, for "stream": false
    {"type": "error", "id": "a" | null, "status": 400, "error": {"message", "type", "param", "code"}}
    {"type": "done", "id": "a", "cancelled": false}        last message of every request

Requests go through the same serving functions, limits, rate limit and error mapping as HTTP. The
connection stays open after a request's error; it closes after a failed auth (4401 / 4403) and on
a message over MAX_BODY_BYTES (1009). Host and Origin are checked at the handshake by the app's guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal, NoReturn

import msgspec
from litestar import WebSocket
from litestar.exceptions import WebSocketDisconnect

from kernel.errors import AuthenticationError, InvalidRequestError, LLMServiceError, RateLimitError
from service.metrics import RequestRecord, Telemetry
from service.schemas.chat import ChatCompletionRequest
from service.schemas.common import decode_strict
from service.schemas.completions import CompletionRequest
from service.security import Security
from service.serving.chat import serve_chat, serve_completion
from service.serving.generation import Generation
from service.serving.streaming import Streamed
from service.settings import Settings

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode
_AUTH_SECONDS = 10.0  # a connection that sends no key in time is closed: it holds a socket for nothing
ROUTE = "/v1/ws"

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class ClientMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["auth", "chat.completions", "completions", "cancel", "ping"]
    id: RequestId | None = None
    body: msgspec.Raw = msgspec.Raw()  # decoded later against the endpoint's own request type
    api_key: str | None = None
    data: Any = None  # ping payload, echoed


ErrorMapper = Callable[[Exception], LLMServiceError]


class _Closed(Exception):
    """The session ends: the client went away, or it is closed for a reason already sent."""


class WebSocketSessions:
    """Created once by the app: serves each connection the route accepts as one session."""

    def __init__(
        self,
        settings: Settings,
        generation: Generation,
        telemetry: Telemetry,
        security: Security,
        errors: ErrorMapper,
    ) -> None:
        self.settings = settings
        self.generation = generation
        self.telemetry = telemetry
        self.security = security
        self.errors = errors

    async def serve(self, socket: WebSocket[Any, Any, Any]) -> None:
        await _Session(socket, self).run()


class _Session:
    def __init__(self, socket: WebSocket[Any, Any, Any], server: WebSocketSessions) -> None:
        self.socket = socket
        self.generation = server.generation
        self.telemetry = server.telemetry
        self.security = server.security
        self.errors = server.errors
        settings = server.settings
        self.max_bytes = settings.max_body_bytes
        self.max_requests = settings.ws_max_requests
        self.key: str | None = None
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.cancelled: set[str] = set()  # ids the client cancelled (their task ends with done/cancelled)
        self._send_lock = asyncio.Lock()  # one writer at a time: concurrent requests interleave whole messages

    # -- the connection ----------------------------------------------------------------------
    async def run(self) -> None:
        await self.socket.accept()
        try:
            await self._authenticate()
            while True:
                await self._handle(await self._receive())
        except _Closed:
            pass
        finally:
            for task in self.tasks.values():
                task.cancel()  # the client is gone: stop every generation it started
            if self.tasks:
                await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def _receive(self, wait: float | None = None) -> ClientMessage | InvalidRequestError:
        """The next message, decoded, or why it is not a valid one."""
        try:
            event = await asyncio.wait_for(self.socket.receive(), wait)
        except TimeoutError:
            await self._close_with(AuthenticationError("No API key within 10 s", code="missing_api_key"), 4401)
        except WebSocketDisconnect:
            raise _Closed from None
        if event["type"] == "websocket.disconnect":
            raise _Closed
        data, text = event.get("bytes"), event.get("text")
        raw = data if isinstance(data, bytes) else text.encode() if isinstance(text, str) else b""
        if len(raw) > self.max_bytes:  # uvicorn refuses these first (ws_max_size); other servers may not
            await self._send_error(None, InvalidRequestError(f"Message over {self.max_bytes} bytes (MAX_BODY_BYTES)"))
            await self.socket.close(code=1009)
            raise _Closed
        self.socket.app.state.last_activity = time.monotonic()  # SHUTDOWN_TIMEOUT counts this as traffic
        try:
            message: ClientMessage = decode_strict(raw, ClientMessage)
        except InvalidRequestError as exc:
            return exc
        return message

    async def _authenticate(self) -> None:
        """Check the header's key, or wait for an auth message when keys are on and none came."""
        header = self.socket.headers.get("authorization")
        if header is not None or not self.security.keys.required:
            self.key = await self._check_key(header)
            return
        first = await self._receive(_AUTH_SECONDS)
        if isinstance(first, ClientMessage) and first.type == "auth":
            await self._auth(first)
            return
        error = AuthenticationError(
            'Missing API key: send \'Authorization: Bearer <key>\' or first {"type": "auth", "api_key": ...}',
            code="missing_api_key",
        )
        await self._close_with(error, 4401)

    async def _auth(self, message: ClientMessage) -> None:
        """An auth message (first, or later to change key): a bad key closes the connection."""
        self.key = await self._check_key(f"Bearer {message.api_key or ''}")
        await self._send({"type": "authenticated"})

    async def _check_key(self, authorization: str | None) -> str | None:
        try:
            return self.security.keys.check(authorization, admin=False)
        except LLMServiceError as exc:
            await self._close_with(exc, 4000 + exc.status)

    async def _close_with(self, error: LLMServiceError, code: int) -> NoReturn:
        await self._send_error(None, error)
        with contextlib.suppress(Exception):
            await self.socket.close(code=code, reason=error.code or "")
        raise _Closed

    # -- one message -------------------------------------------------------------------------
    async def _handle(self, message: ClientMessage | InvalidRequestError) -> None:
        if isinstance(message, InvalidRequestError):
            await self._send_error(None, message)
            return
        kind, rid = message.type, message.id
        if kind == "ping":
            await self._send({"type": "pong", "data": message.data})
        elif kind == "auth":
            await self._auth(message)
        elif rid is None:
            await self._send_error(None, InvalidRequestError(f"A {kind} message needs an id", param="id"))
        elif kind == "cancel":
            await self._cancel(rid)
        elif not message.body:
            await self._send_error(rid, InvalidRequestError(f"A {kind} message needs a body", param="body"))
        elif rid in self.tasks:
            await self._send_error(rid, InvalidRequestError(f"Request {rid!r} is still running", param="id"))
        elif len(self.tasks) >= self.max_requests:
            error = RateLimitError(
                f"This connection already runs {len(self.tasks)} requests (WS_MAX_REQUESTS); wait for one to finish",
                retry_after=1,
                code="too_many_requests",
            )
            await self._send_error(rid, error)
            await self._send_done(rid)
        else:
            self.tasks[rid] = asyncio.create_task(self._request(rid, kind, bytes(message.body)), name=f"ws-{rid}")

    async def _cancel(self, rid: str) -> None:
        task = self.tasks.get(rid)
        if task is None:  # never sent, or already done (its `done` may be on its way)
            error = InvalidRequestError(f"No running request {rid!r} to cancel", param="id", code="request_not_found")
            await self._send_error(rid, error)
            return
        self.cancelled.add(rid)
        task.cancel()

    async def _request(self, rid: str, kind: str, body: bytes) -> None:
        record = self.telemetry.begin(ROUTE, kind, True)
        status = 200
        try:
            answer = await self._serve(kind, body, record)
            if isinstance(answer, Streamed):
                await self._stream(rid, answer)
            else:
                await self._send({"type": "response", "id": rid, "data": answer})
        except asyncio.CancelledError:
            status = 499  # the client's cancel, or the connection went away
        except _Closed:
            status = 499
        except Exception as exc:
            error = self.errors(exc)
            status = error.status
            with contextlib.suppress(_Closed):
                await self._send_error(rid, error)
        finally:
            self.tasks.pop(rid, None)
            self.telemetry.finish(record, status)
        cancelled = rid in self.cancelled
        self.cancelled.discard(rid)
        if status != 499 or cancelled:
            with contextlib.suppress(_Closed):
                await self._send_done(rid, cancelled=cancelled)

    async def _serve(self, kind: str, body: bytes, record: RequestRecord) -> Any:
        self.security.throttle(self.key, self.socket.scope.get("client"), record)
        if kind == "chat.completions":
            return await serve_chat(decode_strict(body, ChatCompletionRequest), self.generation, record)
        return await serve_completion(decode_strict(body, CompletionRequest), self.generation, record)

    async def _stream(self, rid: str, answer: Streamed) -> None:
        def frame(event: Any) -> bytes:
            return event if isinstance(event, bytes) else _encode({"type": "chunk", "id": rid, "data": event})

        def error(exc: LLMServiceError) -> bytes:  # an error after the start: one error message, as SSE has
            return _encode(_error_message(rid, exc))

        # aclosing: a cancel that lands while sending still runs the stream's `finally`, which
        # cancels the job in the engine.
        async with contextlib.aclosing(
            answer.events(self.generation.drain, frame=frame, error=error, done=b"")
        ) as events:
            async for message in events:
                await self._send_bytes(message)

    # -- sending -----------------------------------------------------------------------------
    async def _send(self, message: dict[str, Any]) -> None:
        await self._send_bytes(_encode(message))

    async def _send_error(self, rid: str | None, error: LLMServiceError) -> None:
        await self._send(_error_message(rid, error))

    async def _send_done(self, rid: str, *, cancelled: bool = False) -> None:
        await self._send({"type": "done", "id": rid, "cancelled": cancelled})

    async def _send_bytes(self, data: bytes) -> None:
        try:
            async with self._send_lock:
                await self.socket.send_data(data.decode(), mode="text")
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:  # the client went away mid-send
            raise _Closed from exc


def _error_message(rid: str | None, error: LLMServiceError) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "error", "id": rid, "status": error.status}
    message.update(error.envelope())
    return message
