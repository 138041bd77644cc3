"""Server-sent events: `data: <json>` per chunk, errors as one event, then `data: [DONE]`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.response import Stream
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Send

from backends.base import Chunk
from kernel.errors import LLMServiceError, ModelUnavailableError
from service.schemas.common import UsageInfo
from service.serving.drain import Drain
from service.serving.generation import usage_info
from service.tiers.workers import ChunkStream

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode
_DRAIN_POLL = 0.25  # seconds between checks, while waiting for a token, of whether shutdown is due


class EventStream(Stream):
    """An SSE response. Litestar lets the handler's default media type (JSON, for handlers that
    may also return a completion object) override a Stream's own; this keeps text/event-stream.
    `first_ready`: the first event comes at once (a generation's: its first chunk is in), so it is
    sent before the disconnect listener starts; False where it may wait (a pull's progress)."""

    def __init__(self, events: AsyncIterator[bytes], *, first_ready: bool = True) -> None:
        # no-cache and X-Accel-Buffering keep proxies from buffering a token stream.
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.first_ready = first_ready

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["media_type"] = self.media_type
        response = super().to_asgi_response(*args, **kwargs)
        if self.first_ready:
            response.__class__ = _FirstEventInline  # same slots: only `send_body` differs
        return response


class _FirstEventInline(ASGIStreamingResponse):
    """Sends the first event from the handler's own task, right after the headers; only then does
    Litestar start its task group (a task for the rest of the events and a disconnect listener),
    whose setup (~0.15 ms) would otherwise come before the first token."""

    __slots__ = ()

    async def send_body(self, send: Send, receive: Receive) -> None:
        events = aiter(self.iterator)
        self.iterator = events
        first = await anext(events, None)
        if first is not None:
            body = first if isinstance(first, bytes) else first.encode(self.encoding)
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await super().send_body(send, receive)


@dataclass(slots=True)
class Streamed:
    """A streaming answer whose job has started (its first chunk is in): the events it makes, to
    be framed as SSE for HTTP or as WebSocket messages by `events`."""

    stream: ChunkStream
    first: Chunk
    opening: list[Any]
    piece: Callable[[Chunk], list[Any]]
    usage_event: Callable[[UsageInfo], Any] | None

    def events(
        self,
        drain: Drain,
        *,
        frame: Callable[[Any], bytes] | None = None,
        error: Callable[[LLMServiceError], Any] = LLMServiceError.envelope,
        done: bytes = b"data: [DONE]\n\n",
    ) -> AsyncGenerator[bytes, None]:
        return event_stream(
            self.stream,
            self.first,
            opening=self.opening,
            piece=self.piece,
            usage_event=self.usage_event,
            drain=drain,
            frame=frame or sse,
            error=error,
            done=done,
        )


def sse(data: Any) -> bytes:
    return b"data: " + _encode(data) + b"\n\n"


def named_sse(event: dict[str, Any]) -> bytes:
    """An SSE event named by its `type` (`event: <type>`), as Anthropic's and the Responses API's are."""
    name: str = event["type"]
    return b"event: " + name.encode() + b"\ndata: " + _encode(event) + b"\n\n"


async def event_stream(
    stream: ChunkStream,
    first: Chunk,
    *,
    opening: list[Any],
    piece: Callable[[Chunk], list[Any]],
    usage_event: Callable[[UsageInfo], Any] | None,
    drain: Drain,
    frame: Callable[[Any], bytes] = sse,
    error: Callable[[LLMServiceError], Any] = LLMServiceError.envelope,
    done: bytes = b"data: [DONE]\n\n",
) -> AsyncGenerator[bytes, None]:
    """SSE events of one job: the `opening` events, the events `piece` makes of each chunk (text, finish
    reason), usage, then `done`; an error after the start is one `error` event. `frame` writes an
    event (OpenAI's `data:` lines by default; Anthropic's API names each event too)."""
    watch = _DrainWatch(drain)
    try:
        for event in opening:
            yield frame(event)
        chunk: Chunk | None = first
        while chunk is not None:
            if chunk.text or chunk.finish_reason:
                for event in piece(chunk):
                    yield frame(event)
            if chunk.usage is not None and usage_event is not None:
                yield frame(usage_event(usage_info(chunk.usage)))
            chunk = await watch.next(stream)
    except LLMServiceError as exc:
        yield frame(error(exc))
    except Exception:
        log.exception("Stream failed")
        yield frame(error(LLMServiceError("Generation failed; see the server log")))
    finally:
        watch.close()
        stream.cancel()  # a no-op after a normal end; stops generation when the client went away
    if done:
        yield done


class _DrainWatch:
    """Waits for a stream's chunks and ends the wait with a 503 once shutdown is due.

    The drain is polled by one timer per stream, every `_DRAIN_POLL` s, which interrupts a wait in
    progress (cancelling it, and so the job): a task and a timeout per token cost ~25 us of the
    event loop's time, which one stream's tokens wait for on a busy CPU."""

    def __init__(self, drain: Drain) -> None:
        self._drain = drain
        self._loop = asyncio.get_running_loop()
        self._waiting: asyncio.Task[Any] | None = None  # the task waiting for a chunk, while it waits
        self._fired = False  # the timer interrupted that wait
        self._timer = self._loop.call_later(_DRAIN_POLL, self._poll)

    def _poll(self) -> None:
        if self._waiting is not None and self._drain.due:
            self._fired = True
            self._waiting.cancel()
        else:
            self._timer = self._loop.call_later(_DRAIN_POLL, self._poll)

    async def next(self, stream: ChunkStream) -> Chunk | None:
        """The next chunk, or a 503 error once shutdown is due (the job is then cancelled)."""
        if self._drain.due:
            stream.cancel()
            raise _shutting_down()
        self._waiting = asyncio.current_task()
        try:
            return await anext(stream, None)
        except asyncio.CancelledError:
            task = self._waiting
            if self._fired and task is not None and task.uncancel() == 0:  # ours alone: not the server's
                self._fired = False
                stream.cancel()
                raise _shutting_down() from None
            raise
        finally:
            self._waiting = None

    def close(self) -> None:
        self._timer.cancel()


def _shutting_down() -> ModelUnavailableError:
    return ModelUnavailableError("The server is shutting down; retry shortly", code="server_shutting_down")
