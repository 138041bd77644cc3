"""Generation stops when its HTTP client goes away before the answer starts.

A handler that waits for a model (queued, prefilling, or generating a whole non-streaming answer)
never reads from the connection, so nothing would notice a client that hung up: its job would hold
a batch slot to the end. For the generating routes (those that declare `stream_events`), this
middleware listens for ASGI's `http.disconnect` once the body is read and cancels the handler when
it comes; the cancellation reaches the job (`JobStream` cancels itself when interrupted), which
leaves the engine's batch at the next step or never starts if still queued. Once the response
starts, Litestar's streaming response listens itself (and cancels the stream the same way).
"""

from __future__ import annotations

import asyncio

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

CLIENT_CLOSED = 499  # nginx's "client closed request": what metrics record for these


class DisconnectMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = scope.get("route_handler")
        if scope["type"] != ScopeType.HTTP or handler is None or "stream_events" not in handler.opt:
            await self.app(scope, receive, send)
            return
        # The handler runs in this task (a task of its own would cost a loop turn before every
        # request); the watch, in a task, cancels this one if the client leaves first.
        task = asyncio.current_task()
        assert task is not None
        watch = _Watch(receive, send)
        gone = asyncio.ensure_future(watch.until_gone())
        gone.add_done_callback(lambda done: watch.interrupt(task) if _gone(done) else None)
        try:
            await self.app(scope, watch.receive, watch.send)
        except asyncio.CancelledError:
            if not watch.interrupted or task.uncancel() > 0:  # the server's cancellation, not the watch's
                raise
            # Nobody reads this (the server drops it): it tells the metrics who ended the request.
            await send({"type": "http.response.start", "status": CLIENT_CLOSED, "headers": []})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            if watch.interrupted:  # the handler swallowed the cancellation: it must not hit a later await
                task.uncancel()
        finally:
            watch.ended = True  # a disconnect heard from now on interrupts nothing
            gone.cancel()
            watch.close()


def _gone(task: asyncio.Future[bool]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None and task.result()


class _Watch:
    """The connection's receive and send as the handler sees them, and a watch on the connection
    from the moment the handler has read the body until its response starts."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._read = asyncio.Event()  # the whole body is in
        self._listening: asyncio.Future[ReceiveMessage] | None = None  # the watch's receive, while it waits
        self._heard: ReceiveMessage | None = None  # what the watch received
        self.started = False
        self.ended = False  # the handler has returned or raised
        self.interrupted = False  # the watch cancelled the handler's task

    def interrupt(self, task: asyncio.Task[object]) -> None:
        """The client left: stop the handler, unless its response has started (the response listens
        itself from then on) or it has ended."""
        if not (self.started or self.ended or self.interrupted):
            self.interrupted = True
            task.cancel()

    async def until_gone(self) -> bool:
        """True once the client disconnects; cancelled, or False, if the response starts first."""
        await self._read.wait()
        if self.started:
            return False
        listening = self._listening = asyncio.ensure_future(self._receive())
        heard = await asyncio.shield(listening)
        self._heard, self._listening = heard, None
        return heard["type"] == "http.disconnect"

    async def receive(self) -> ReceiveMessage:
        if self._heard is not None:  # taken by the watch: the handler gets it too
            return self._heard
        if self._listening is not None:  # never two receives at once: share the watch's
            return await asyncio.shield(self._listening)
        message = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self._read.set()
        return message

    def close(self) -> None:
        listening, self._listening = self._listening, None
        if listening is not None:
            listening.cancel()  # a receive waiting on the server may be cancelled; it loses nothing

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.close()  # the response listens for the client itself from here on
        await self._send(message)
