"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) for the `anthropic`
SDK and Claude Code, on the same generation path as chat: content blocks become OpenAI-shaped
messages, `tool_use`/`tool_result` become tool calls and results, and the answer goes back as
content blocks (streamed with Anthropic's event types)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from litestar import Controller, post

from backends.base import Chunk
from kernel.errors import InvalidRequestError, LLMServiceError
from service.answer import Answer
from service.dispatch import Dispatcher
from service.families import GENERATION
from service.generation import collect, engine_request, first_chunk
from service.metrics import RequestRecord
from service.registry import Registry
from service.schemas.common import SamplingFields
from service.schemas.messages import (
    CountTokensRequest,
    CountTokensResponse,
    Message,
    MessageParam,
    MessagesRequest,
    MessageUsage,
    TextBlock,
    ThinkingBlock,
    ToolChoice,
    ToolParam,
    ToolResultBlock,
    ToolUseBlock,
)
from service.streaming import EventStream, event_stream, named_sse
from service.tool_calls import ToolMode, ToolPlan, make_plan

_STREAMED = (
    "With `stream: true`: Anthropic's named events, each `event: <type>` and `data: <json>`: message_start, "
    "content_block_start / content_block_delta / content_block_stop per block, message_delta, message_stop; an "
    "error after the start as one `event: error`"
)
_MODES: dict[str, ToolMode] = {"auto": "auto", "any": "required", "tool": "named", "none": "none"}


class MessagesController(Controller):
    path = "/v1/messages"

    @post(status_code=200, summary="Create a message (Anthropic Messages API)", opt={"stream_events": _STREAMED})
    async def create(
        self, data: MessagesRequest, registry: Registry, dispatch: Dispatcher, record: RequestRecord
    ) -> Message | EventStream:
        if data.thinking is not None and data.thinking.type == "enabled":
            raise InvalidRequestError("Extended thinking is not supported by this server", param="thinking")
        slot, adapter = registry.generation_target(data.model, data.adapter)
        plan = _plan(data.tools, data.tool_choice)
        fields = SamplingFields(
            model=data.model, temperature=data.temperature, top_p=data.top_p, top_k=data.top_k, stop=data.stop_sequences
        )
        request = engine_request(
            fields,
            slot.settings,
            max_tokens=data.max_tokens,
            messages=_messages(data.system, data.messages),
            tools=plan.tools,
            constraint=plan.forced,
            adapter=adapter,
        )
        stream = await dispatch.generate("chat", slot, request, record)  # the same work as chat: one cache
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        answer = Answer(slot, plan)
        if not data.stream:
            whole, usage = await collect(stream)
            parts, found = answer.split(whole.text)
            content: list[ThinkingBlock | TextBlock | ToolUseBlock] = []
            if parts.reasoning:
                content.append(ThinkingBlock(thinking=parts.reasoning))
            if parts.content:
                content.append(TextBlock(text=parts.content))
            content += [ToolUseBlock(id=_tool_id(), name=c.name, input=json.loads(c.arguments)) for c in found]
            cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
            return Message(
                mid,
                data.model,
                content,
                _stop_reason(whole, bool(found)),
                whole.stop_sequence,
                MessageUsage(usage.prompt_tokens, usage.completion_tokens, cache_read_input_tokens=cached),
            )
        first = await first_chunk(stream)
        return EventStream(_events(dispatch, stream, first, mid, data.model, answer))

    @post("/count_tokens", status_code=200, summary="Count a message's input tokens (Anthropic)")
    async def count_tokens(self, data: CountTokensRequest, registry: Registry) -> CountTokensResponse:
        slot = registry.generation_target(data.model)[0]  # an adapter does not change tokens
        plan = _plan(data.tools, None)
        fields = SamplingFields(model=data.model)
        request = engine_request(
            fields, slot.settings, max_tokens=1, messages=_messages(data.system, data.messages), tools=plan.tools
        )
        return CountTokensResponse(len(await GENERATION.tokenize(await registry.ensure_loaded(slot), request)))


def _plan(tools: list[ToolParam] | None, choice: ToolChoice | None) -> ToolPlan:
    for tool in tools or ():
        if tool.type not in (None, "custom"):
            raise InvalidRequestError(f"Tool type {tool.type!r} is not supported; only custom tools", param="tools")
    offered = tuple(
        {
            "type": "function",
            "function": {"name": t.name, "parameters": t.input_schema}
            | ({"description": t.description} if t.description else {}),
        }
        for t in tools or ()
    )
    if choice is not None and choice.type == "tool" and not choice.name:
        raise InvalidRequestError("tool_choice of type tool needs a name", param="tool_choice")
    return make_plan(
        offered or None,
        _MODES[choice.type] if choice else "auto",
        choice.name if choice else None,
        parallel=not (choice and choice.disable_parallel_tool_use),
    )


def _messages(system: str | list[TextBlock] | None, messages: list[MessageParam]) -> tuple[dict[str, Any], ...]:
    """Content blocks as the OpenAI-shaped messages engines take."""
    if not messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": system if isinstance(system, str) else _text(system)})
    for message in messages:
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in message.content:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock) and message.role == "assistant":
                arguments = json.dumps(block.input, ensure_ascii=False)
                calls.append(
                    {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}}
                )
            elif isinstance(block, ThinkingBlock) and message.role == "assistant":
                continue  # earlier thinking stays out of the prompt, as reasoning models' templates do
            elif isinstance(block, ToolResultBlock) and message.role == "user":
                content = block.content if isinstance(block.content, str) else _text(block.content or [])
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
            else:
                kind = block.__struct_config__.tag  # the block's "type"
                raise InvalidRequestError(
                    f"{kind} content is not supported in a {message.role} message", param="messages"
                )
        if message.role == "assistant":
            out.append({"role": "assistant", "content": "".join(texts)} | ({"tool_calls": calls} if calls else {}))
        elif texts:
            out.append({"role": "user", "content": "".join(texts)})
    return tuple(out)


def _text(blocks: list[Any]) -> str:
    for block in blocks:
        if not isinstance(block, TextBlock):
            raise InvalidRequestError("Only text content is supported here", param="messages")
    return "".join(b.text for b in blocks)


def _stop_reason(final: Chunk, tool_use: bool) -> Any:
    if tool_use:
        return "tool_use"
    if final.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if final.stop_sequence else "end_turn"


def _tool_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def _error(exc: LLMServiceError) -> dict[str, Any]:
    kind = "overloaded_error" if exc.status in (429, 503) else exc.type
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def _events(dispatch: Dispatcher, stream: Any, first: Chunk, mid: str, model: str, answer: Answer) -> Any:
    """Anthropic's stream: message_start, a thinking block and a text block (deltas), tool_use
    blocks, message_delta, message_stop."""
    state: dict[str, Any] = {"index": -1, "open": None}  # the open block's type

    def block_events(kind: str, text: str) -> list[dict[str, Any]]:
        events = []
        if state["open"] != kind:
            if state["open"] is not None:
                events.append({"type": "content_block_stop", "index": state["index"]})
            state["index"] += 1
            state["open"] = kind
            thinking = {"type": "thinking", "thinking": "", "signature": ""}
            block = {"type": "text", "text": ""} if kind == "text" else thinking
            events.append({"type": "content_block_start", "index": state["index"], "content_block": block})
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta", "thinking": text}
        return [*events, {"type": "content_block_delta", "index": state["index"], "delta": delta}]

    def parts_events(reasoning: str, content: str) -> list[dict[str, Any]]:
        return (block_events("thinking", reasoning) if reasoning else []) + (
            block_events("text", content) if content else []
        )

    def piece(part: Chunk) -> list[dict[str, Any]]:
        parts = answer.feed(part.text)
        events = parts_events(parts.reasoning, parts.content)
        if part.finish_reason is None:
            return events
        tail, found = answer.finish()
        events += parts_events(tail.reasoning, tail.content)
        if state["open"] is not None:
            events.append({"type": "content_block_stop", "index": state["index"]})
        for call in found:
            state["index"] += 1
            block = {"type": "tool_use", "id": _tool_id(), "name": call.name, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": call.arguments}
            events += [
                {"type": "content_block_start", "index": state["index"], "content_block": block},
                {"type": "content_block_delta", "index": state["index"], "delta": delta},
                {"type": "content_block_stop", "index": state["index"]},
            ]
        usage = part.usage
        return [
            *events,
            {
                "type": "message_delta",
                "delta": {"stop_reason": _stop_reason(part, bool(found)), "stop_sequence": part.stop_sequence},
                "usage": {
                    "input_tokens": usage.prompt_tokens if usage else 0,
                    "output_tokens": usage.completion_tokens if usage else 0,
                },
            },
            {"type": "message_stop"},
        ]

    opening = {
        "type": "message_start",
        "message": {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        },
    }
    return event_stream(
        stream,
        first,
        opening=[opening],
        piece=piece,
        usage_event=None,
        drain=dispatch.drain,
        frame=named_sse,
        error=_error,
        done=b"",
    )
