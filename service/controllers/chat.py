from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, post

from backends.tools import ToolCall, tool_format
from kernel.errors import InvalidRequestError
from service.dispatch import Dispatcher
from service.generation import collect, engine_request, first_chunk, new_id, now
from service.metrics import RequestRecord
from service.registry import Registry
from service.schemas.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChunkChoice,
    Delta,
)
from service.streaming import EventStream, event_stream
from service.tool_calls import ToolCallFilter, call_deltas, plan_tools, wire_calls


class ChatController(Controller):
    path = "/v1/chat/completions"

    @post(status_code=200, summary="Create a chat completion", opt={"stream_events": ChatCompletionChunk})
    async def create(
        self, data: ChatCompletionRequest, registry: Registry, dispatch: Dispatcher, record: RequestRecord
    ) -> ChatCompletion | EventStream:
        if not data.messages:
            raise InvalidRequestError("messages must contain at least one message", param="messages")
        slot = registry.generation_slot(data.model)
        tools = plan_tools(data)
        request = engine_request(
            data,
            slot.settings,
            max_tokens=data.max_completion_tokens or data.max_tokens,
            messages=tuple(_message(m) for m in data.messages),
            tools=tools.tools,
            constraint=tools.forced,
        )
        stream = await dispatch.generate("chat", slot, request, record)
        cid, created, model = new_id("chatcmpl"), now(), data.model
        # Known once the tier has loaded, which generate() waited for (a cache replay may not have).
        calls = ToolCallFilter(slot.tool_format or tool_format(None, slot.settings.tool_parser), tools)
        if not data.stream:
            text, finish_reason, usage = await collect(stream)
            content, found = text, list[ToolCall]()
            if tools.active:
                sent = calls.feed(text)
                tail, found = calls.finish()
                content = sent + tail
            message = AssistantMessage("assistant", content or (None if found else ""), wire_calls(found) or None)
            return ChatCompletion(
                cid, created, model, [ChatChoice(0, message, "tool_calls" if found else finish_reason)], usage
            )

        first = await first_chunk(stream)

        def chunk(delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(cid, created, model, [ChunkChoice(0, delta, finish)])

        def piece(text: str, finish: str | None) -> list[ChatCompletionChunk]:
            if not tools.active:
                return [chunk(Delta(content=text) if text else Delta(), finish)]
            events = [chunk(Delta(content=content))] if (content := calls.feed(text)) else []
            if finish is None:
                return events
            tail, found = calls.finish()
            if tail:
                events.append(chunk(Delta(content=tail)))
            events += [chunk(Delta(tool_calls=delta)) for delta in call_deltas(wire_calls(found))]
            return [*events, chunk(Delta(), "tool_calls" if found else finish)]

        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        events = event_stream(
            stream,
            first,
            opening=ChatCompletionChunk(cid, created, model, [ChunkChoice(0, Delta(role="assistant", content=""))]),
            piece=piece,
            usage_event=(lambda u: ChatCompletionChunk(cid, created, model, [], usage=u)) if include_usage else None,
            drain=dispatch.drain,
        )
        return EventStream(events)


def _message(message: ChatMessage) -> dict[str, Any]:
    # OpenAI's newer "developer" role is the system role for every chat template we know.
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
    if message.tool_calls:
        out["tool_calls"] = [
            msgspec.structs.asdict(c) | {"function": msgspec.structs.asdict(c.function)} for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out
