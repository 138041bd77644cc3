from __future__ import annotations

from collections.abc import Callable

from litestar import Controller, post

from backends.base import Chunk
from backends.tools import tool_format
from kernel.errors import InvalidRequestError
from service.dispatch import Dispatcher
from service.generation import chat_logprobs, chat_messages, collect, engine_request, first_chunk, new_id, now
from service.metrics import RequestRecord
from service.registry import Registry
from service.schemas.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
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
        return await chat_completion(data, registry, dispatch, record)


async def chat_completion(
    data: ChatCompletionRequest,
    registry: Registry,
    dispatch: Dispatcher,
    record: RequestRecord,
    *,
    opening: Callable[[ChatCompletionChunk], ChatCompletionChunk] | None = None,
) -> ChatCompletion | EventStream:
    """The one chat path (RAG chat calls it too); `opening` dresses a stream's first event."""
    if not data.messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")
    slot = registry.generation_slot(data.model)
    tools = plan_tools(data)
    request = engine_request(
        data,
        slot.settings,
        max_tokens=data.max_completion_tokens or data.max_tokens,
        messages=chat_messages(data.messages),
        tools=tools.tools,
        constraint=tools.forced,
        logprobs=data.logprobs,
        top_logprobs=data.top_logprobs or 0,
    )
    stream = await dispatch.generate("chat", slot, request, record)
    cid, created, model = new_id("chatcmpl"), now(), data.model
    # Known once the tier has loaded, which generate() waited for (a cache replay may not have).
    calls = ToolCallFilter(slot.tool_format or tool_format(None, slot.settings.tool_parser), tools)
    if not data.stream:
        whole, usage = await collect(stream)
        content, found = calls.split(whole.text)
        message = AssistantMessage("assistant", content or (None if found else ""), wire_calls(found) or None)
        choice = ChatChoice(0, message, "tool_calls" if found else whole.finish_reason, chat_logprobs(whole))
        return ChatCompletion(cid, created, model, [choice], usage)

    first = await first_chunk(stream)

    def chunk(delta: Delta, finish: str | None = None, logprobs: ChoiceLogprobs | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(cid, created, model, [ChunkChoice(0, delta, finish, logprobs)])

    def piece(part: Chunk) -> list[ChatCompletionChunk]:
        text, finish, logprobs = part.text, part.finish_reason, chat_logprobs(part)
        if not tools.active:
            return [chunk(Delta(content=text) if text else Delta(), finish, logprobs)]
        events = [chunk(Delta(content=content), None, logprobs)] if (content := calls.feed(text)) else []
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
        opening=(opening or _same)(
            ChatCompletionChunk(cid, created, model, [ChunkChoice(0, Delta(role="assistant", content=""))])
        ),
        piece=piece,
        usage_event=(lambda u: ChatCompletionChunk(cid, created, model, [], usage=u)) if include_usage else None,
        drain=dispatch.drain,
    )
    return EventStream(events)


def _same(chunk: ChatCompletionChunk) -> ChatCompletionChunk:
    return chunk
