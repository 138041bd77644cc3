"""Anthropic's Messages API (`POST /v1/messages`) for the `anthropic` SDK and Claude Code, on the
same generation path as chat: the request's blocks become one engine request
(service.serving.message_blocks), and the answer goes back as content blocks (thinking, text,
tool_use), streamed with Anthropic's event types."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from litestar import Response as HttpResponse

from backends.base import Chunk
from kernel.errors import LLMServiceError
from service.ids import new_id
from service.metrics import RequestRecord
from service.schemas.common import SamplingFields, UsageInfo
from service.schemas.messages import (
    CountTokensRequest,
    Message,
    MessagesRequest,
    MessageUsage,
    TextBlock,
    ThinkingBlock,
    ToolUseBlock,
)
from service.schemas.stream_events import (
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    ErrorDetail,
    InputJsonDelta,
    MessageDelta,
    MessageError,
    MessageEvent,
    MessageStart,
    MessageStop,
    StartedMessage,
    StopDelta,
    StopReason,
    TextDelta,
    ThinkingDelta,
    named_frame,
)
from service.serving.answer import Answer
from service.serving.generation import Generation, collect, engine_request, first_chunk
from service.serving.message_blocks import message_prompt
from service.serving.passthrough import relay, relays
from service.serving.streaming import event_stream


async def create_message(
    data: MessagesRequest,
    generation: Generation,
    record: RequestRecord,
    body: Callable[[], Awaitable[bytes]],
    headers: Mapping[str, str],
) -> Message | AsyncGenerator[bytes, None] | HttpResponse[Any]:
    """The whole message, or its SSE events once the job has started (so a prompt error is still
    a plain error); the upstream's own answer where the tier relays Messages (REMOTE_PASSTHROUGH,
    with the request's `anthropic-*` headers). `body`: the request as sent, read only to relay it."""
    target = generation.target(data.model, data.adapter)
    if relays(target, "messages"):
        return await relay("messages", target, await body(), headers, generation, record, lambda _, exc: _error(exc))
    slot = target.slot
    prompt = message_prompt(data, slot.settings)
    fields = SamplingFields(
        model=data.model,
        temperature=data.temperature,
        top_p=data.top_p,
        top_k=data.top_k,
        stop=data.stop_sequences,
        user=data.metadata.user_id if data.metadata is not None else None,
    )
    request = engine_request(
        fields,
        slot.settings,
        await generation.sampling(target, fields),
        max_tokens=data.max_tokens,
        messages=prompt.messages,
        images=await generation.images.load(prompt.images),
        tools=prompt.plan.tools,
        constraint=prompt.plan.forced or prompt.format,
        adapter=target.adapter_name,
        thinking=prompt.thinking,
    )
    [stream] = await generation.generate("chat", target, request, record)  # chat's work: one cache
    mid = new_id("msg_")
    answer = Answer(slot, prompt.plan, constrained=prompt.format is not None, thinking=request.thinking)
    if not data.stream:
        whole, usage = await collect(stream)
        return _message(mid, data.model, answer, whole, usage)
    first = await first_chunk(stream)
    return event_stream(
        stream,
        first,
        opening=[MessageStart(StartedMessage(id=mid, model=data.model))],
        piece=_MessageStream(answer).piece,
        usage_event=None,
        drain=generation.drain,
        frame=named_frame,
        error=_error,
        done=b"",
    )


async def count_tokens(data: CountTokensRequest, generation: Generation) -> int:
    """The prompt's tokens as `create_message` would feed them, under the same bound as /tokenize."""
    target = generation.target(data.model)  # an adapter does not change tokens
    prompt = message_prompt(data, target.slot.settings)
    request = engine_request(
        SamplingFields(model=data.model),
        target.slot.settings,
        target.slot.sampling()[0],  # sampling does not change the tokens: no need to wait for the card
        max_tokens=1,
        messages=prompt.messages,
        images=await generation.images.load(prompt.images),
        tools=prompt.plan.tools,
        thinking=prompt.thinking,
    )
    return len((await generation.tokens(target, request)).ids)


def _message(mid: str, model: str, answer: Answer, whole: Chunk, usage: UsageInfo) -> Message:
    parts, found = answer.split(whole.text)
    content: list[ThinkingBlock | TextBlock | ToolUseBlock] = []
    if parts.reasoning:
        content.append(ThinkingBlock(thinking=parts.reasoning))
    if parts.content:
        content.append(TextBlock(text=parts.content))
    content += [ToolUseBlock(id=new_id("toolu_"), name=c.name, input=json.loads(c.arguments)) for c in found]
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return Message(
        mid,
        model,
        content,
        _stop_reason(whole, bool(found)),
        whole.stop_sequence,
        MessageUsage(usage.prompt_tokens - cached, usage.completion_tokens, cache_read_input_tokens=cached),
    )


def _stop_reason(final: Chunk, tool_use: bool) -> StopReason:
    if tool_use:
        return "tool_use"
    if final.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if final.stop_sequence else "end_turn"


def _error(exc: LLMServiceError) -> MessageError:
    kind = "overloaded_error" if exc.status in (429, 503) else exc.type
    return MessageError(ErrorDetail(kind, exc.message))


@dataclass(slots=True)
class _MessageStream:
    """Anthropic's stream after message_start: a thinking block and a text block (deltas), tool_use
    blocks, message_delta, message_stop. Blocks are numbered in the order they open."""

    answer: Answer
    index: int = -1  # the last block opened
    open: Literal["thinking", "text"] | None = None  # the open block's type

    def piece(self, part: Chunk) -> list[MessageEvent]:
        parts = self.answer.feed(part.text)
        events = self._parts(parts.reasoning, parts.content)
        if part.finish_reason is None:
            return events
        tail, found = self.answer.finish()
        events += self._parts(tail.reasoning, tail.content)
        if self.open is not None:
            events.append(ContentBlockStop(self.index))
        for call in found:
            self.index += 1
            events += [
                ContentBlockStart(self.index, ToolUseBlock(id=new_id("toolu_"), name=call.name, input={})),
                ContentBlockDelta(self.index, InputJsonDelta(call.arguments)),
                ContentBlockStop(self.index),
            ]
        usage = part.usage
        cached = usage.cached_tokens if usage else 0
        said = MessageUsage(
            usage.prompt_tokens - cached if usage else 0, usage.completion_tokens if usage else 0, cached, 0
        )
        return [
            *events,
            MessageDelta(StopDelta(_stop_reason(part, bool(found)), part.stop_sequence), said),
            MessageStop(),
        ]

    def _parts(self, reasoning: str, content: str) -> list[MessageEvent]:
        return (self._block("thinking", reasoning) if reasoning else []) + (
            self._block("text", content) if content else []
        )

    def _block(self, kind: Literal["thinking", "text"], text: str) -> list[MessageEvent]:
        """`text` as a delta of a block of `kind`, opening one (and stopping the last) if needed."""
        events: list[MessageEvent] = []
        if self.open != kind:
            if self.open is not None:
                events.append(ContentBlockStop(self.index))
            self.index += 1
            self.open = kind
            opened = TextBlock(text="") if kind == "text" else ThinkingBlock(thinking="")
            events.append(ContentBlockStart(self.index, opened))
        delta = TextDelta(text) if kind == "text" else ThinkingDelta(text)
        return [*events, ContentBlockDelta(self.index, delta)]
