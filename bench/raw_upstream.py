"""The cheapest OpenAI-compatible upstream there is, for timing a front's own cost (issue 28):
raw ASGI on uvicorn, no model. `python bench/raw_upstream.py PORT`; `GET /v1/models` names one
model, `POST /v1/completions` and `/v1/chat/completions` stream the same four pieces, a finish
reason and usage, whatever was asked."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn

MODELS = json.dumps({"object": "list", "data": [{"id": "raw", "object": "model", "created": 0, "owned_by": "bench"}]})


def events(chat: bool) -> Iterator[bytes]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    for piece in ("Hel", "lo", " the", "re"):
        choice = {"index": 0, "finish_reason": None, **({"delta": {"content": piece}} if chat else {"text": piece})}
        yield _event({"id": "r", "object": kind, "created": 0, "model": "raw", "choices": [choice]})
    last = {"index": 0, "finish_reason": "length", **({"delta": {}} if chat else {"text": ""})}
    usage = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    yield _event({"id": "r", "object": kind, "created": 0, "model": "raw", "choices": [last], "usage": usage})
    yield b"data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    while (await receive()).get("more_body"):  # the request body, unread
        pass
    if scope["method"] == "GET":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": MODELS.encode()})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for event in events("chat" in scope["path"]):
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
