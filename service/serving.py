"""Chat and legacy completions, whatever carries them: HTTP (with SSE) or the WebSocket.

Each function takes the decoded request and returns the whole answer, or a `Streamed` answer
whose job has started (so a prompt error is still a plain error, not an event)."""

from __future__ import annotations

from typing import Any

from backends.base import Chunk
from backends.tools import tool_format
from kernel.errors import InvalidRequestError
from service.dispatch import Dispatcher
from service.generation import (
    chat_logprobs,
    chat_messages,
    collect,
    completion_logprobs,
    engine_request,
    first_chunk,
    new_id,
    now,
)
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
from service.schemas.completions import Completion, CompletionChoice, CompletionRequest
from service.streaming import Streamed
from service.tool_calls import ToolCallFilter, call_deltas, plan_tools, wire_calls


async def serve_chat(
    data: ChatCompletionRequest, registry: Registry, dispatch: Dispatcher, record: RequestRecord
) -> ChatCompletion | Streamed:
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
    return Streamed(
        stream,
        first,
        opening=ChatCompletionChunk(cid, created, model, [ChunkChoice(0, Delta(role="assistant", content=""))]),
        piece=piece,
        usage_event=(lambda u: ChatCompletionChunk(cid, created, model, [], usage=u)) if include_usage else None,
    )


async def serve_completion(
    data: CompletionRequest, registry: Registry, dispatch: Dispatcher, record: RequestRecord
) -> Completion | Streamed:
    if data.suffix:
        raise InvalidRequestError("suffix (fill-in-the-middle) is not supported", param="suffix")
    prompt = _single_prompt(data.prompt)
    slot = registry.generation_slot(data.model)
    scored = data.logprobs is not None
    request = engine_request(
        data,
        slot.settings,
        max_tokens=data.max_tokens,
        prompt=prompt,
        logprobs=scored,
        top_logprobs=data.logprobs or 0,
    )
    stream = await dispatch.generate("completions", slot, request, record)
    cid, created, model = new_id("cmpl"), now(), data.model
    echo = prompt if data.echo and isinstance(prompt, str) else ""
    if not data.stream:
        whole, usage = await collect(stream)
        logprobs = completion_logprobs(whole, len(echo))
        return Completion(
            cid, created, model, [CompletionChoice(0, echo + whole.text, whole.finish_reason, logprobs)], usage
        )

    first = await first_chunk(stream)
    offset = len(echo)

    def piece(part: Chunk) -> list[Completion]:
        nonlocal offset
        choice = CompletionChoice(0, part.text, part.finish_reason, completion_logprobs(part, offset))
        offset += len(part.text)
        return [Completion(cid, created, model, [choice])]

    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    return Streamed(
        stream,
        first,
        opening=Completion(cid, created, model, [CompletionChoice(0, echo, None)]) if echo else None,
        piece=piece,
        usage_event=(lambda u: Completion(cid, created, model, [], usage=u)) if include_usage else None,
    )


def _single_prompt(prompt: str | list[Any]) -> str | list[int]:
    """One prompt per request: a string, a list of token ids, or a one-element list of either."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in prompt):
        return list(prompt)
    if all(isinstance(p, str) for p in prompt):
        raise InvalidRequestError("Only one prompt per request is supported", param="prompt")
    raise InvalidRequestError("prompt must be a string or a list of token ids", param="prompt")
