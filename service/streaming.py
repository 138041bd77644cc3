"""Server-sent events: `data: <json>` per chunk, errors as one event, then `data: [DONE]`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from litestar.response import Stream

from backends.base import Chunk
from kernel.errors import LLMServiceError
from service.generation import usage_info
from service.schemas.common import UsageInfo
from service.workers import ChunkStream

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode


class EventStream(Stream):
    """An SSE response. Litestar lets the handler's default media type (JSON, for handlers that
    may also return a completion object) override a Stream's own; this keeps text/event-stream."""

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        # no-cache and X-Accel-Buffering keep proxies from buffering a token stream.
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["media_type"] = self.media_type
        return super().to_asgi_response(*args, **kwargs)


def sse(data: Any) -> bytes:
    return b"data: " + _encode(data) + b"\n\n"


async def event_stream(
    stream: ChunkStream,
    first: Chunk,
    *,
    opening: Any | None,
    piece: Callable[[str, str | None], list[Any]],
    usage_event: Callable[[UsageInfo], Any] | None,
) -> AsyncIterator[bytes]:
    """SSE events of one job: `opening`, the events `piece` makes of each chunk (text, finish
    reason), usage, then [DONE]."""
    try:
        if opening is not None:
            yield sse(opening)
        chunk: Chunk | None = first
        while chunk is not None:
            if chunk.text or chunk.finish_reason:
                for event in piece(chunk.text, chunk.finish_reason):
                    yield sse(event)
            if chunk.usage is not None and usage_event is not None:
                yield sse(usage_event(usage_info(chunk.usage)))
            chunk = await anext(stream, None)
    except LLMServiceError as exc:
        yield sse(exc.envelope())
    except Exception:
        log.exception("Stream failed")
        yield sse(
            {
                "error": {
                    "message": "Generation failed; see the server log",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        )
    finally:
        stream.cancel()  # a no-op after a normal end; stops generation when the client went away
    yield b"data: [DONE]\n\n"
