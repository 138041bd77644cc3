"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) for the `anthropic`
SDK and Claude Code, on the same generation path as chat: content blocks become OpenAI-shaped
messages, `tool_use`/`tool_result` become tool calls and results, and the answer goes back as
content blocks (streamed with Anthropic's event types).

What Claude Code sends is the yardstick (docs/api.md lists each field's treatment): system turns
inside `messages`, custom tools without a `type` beside Anthropic's own tools (left out of the
prompt), history blocks of Anthropic-side work (left out), `thinking` and `output_config.effort`
(mapped through `service.serving.thinking`), beta fields and headers (hints). `?beta=true` and the
`anthropic-beta` / `anthropic-version` headers change nothing."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from litestar import Controller, post

from backends.base import Chunk, ResponseFormat
from kernel.errors import InvalidRequestError, LLMServiceError
from service.metrics import RequestRecord
from service.schemas.common import SamplingFields
from service.schemas.messages import (
    CountTokensRequest,
    CountTokensResponse,
    DocumentBlock,
    ImageBlock,
    Message,
    MessageParam,
    MessagesRequest,
    MessageUsage,
    PromptFields,
    SearchResultBlock,
    TextBlock,
    ThinkingBlock,
    ToolChoice,
    ToolParam,
    ToolReferenceBlock,
    ToolResultBlock,
    ToolUseBlock,
    content_block,
)
from service.serving.answer import Answer
from service.serving.generation import Generation, collect, engine_request, first_chunk
from service.serving.schema_limits import check_schema
from service.serving.streaming import EventStream, event_stream, named_sse
from service.serving.thinking import ThinkingControl, thinking_control
from service.serving.tool_calls import ToolMode, ToolPlan, make_plan

_STREAMED = (
    "With `stream: true`: Anthropic's named events, each `event: <type>` and `data: <json>`: message_start, "
    "content_block_start / content_block_delta / content_block_stop per block, message_delta, message_stop; an "
    "error after the start as one `event: error`"
)
_MODES: dict[str, ToolMode] = {"auto": "auto", "any": "required", "tool": "named", "none": "none"}
# Earlier thinking, and the record of work Anthropic's servers did (their tool calls and results,
# files put in a container), stay out of the prompt: our model can neither read nor repeat them.
_LEFT_OUT = frozenset(
    {
        "redacted_thinking",
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "tool_search_tool_result",
        "mcp_tool_use",
        "mcp_tool_result",
        "container_upload",
    }
)


class MessagesController(Controller):
    path = "/v1/messages"

    @post(status_code=200, summary="Create a message (Anthropic Messages API)", opt={"stream_events": _STREAMED})
    async def create(
        self, data: MessagesRequest, generation: Generation, record: RequestRecord
    ) -> Message | EventStream:
        target = generation.target(data.model, data.adapter)
        slot = target.slot
        prompt = _prompt(data)
        fields = SamplingFields(
            model=data.model, temperature=data.temperature, top_p=data.top_p, top_k=data.top_k, stop=data.stop_sequences
        )
        request = engine_request(
            fields,
            slot.settings,
            max_tokens=data.max_tokens,
            messages=prompt.messages,
            tools=prompt.plan.tools,
            constraint=prompt.plan.forced or prompt.format,
            adapter=target.adapter_name,
            thinking=prompt.thinking,
        )
        [stream] = await generation.generate("chat", target, request, record)  # the same work as chat: one cache
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        answer = Answer(slot, prompt.plan, constrained=prompt.format is not None, thinking=request.thinking)
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
                MessageUsage(usage.prompt_tokens - cached, usage.completion_tokens, cache_read_input_tokens=cached),
            )
        first = await first_chunk(stream)
        return EventStream(_events(generation, stream, first, mid, data.model, answer))

    @post("/count_tokens", status_code=200, summary="Count a message's input tokens (Anthropic)")
    async def count_tokens(self, data: CountTokensRequest, generation: Generation) -> CountTokensResponse:
        target = generation.target(data.model)  # an adapter does not change tokens
        prompt = _prompt(data)
        request = engine_request(
            SamplingFields(model=data.model),
            target.slot.settings,
            max_tokens=1,
            messages=prompt.messages,
            tools=prompt.plan.tools,
            thinking=prompt.thinking,
        )
        return CountTokensResponse(len((await generation.tokens(target, request)).ids))


@dataclass(frozen=True, slots=True)
class _Prompt:
    messages: tuple[dict[str, Any], ...]
    plan: ToolPlan
    thinking: ThinkingControl
    format: ResponseFormat | None  # output_config.format's grammar


def _prompt(data: PromptFields) -> _Prompt:
    """Everything of a request that shapes the prompt, as the engine request takes it."""
    if data.mcp_servers:
        raise InvalidRequestError(
            "mcp_servers is not supported: this server cannot call MCP servers (offer their tools as custom tools)",
            param="mcp_servers",
        )
    messages, loaded = _messages(data.system, data.messages)
    spec = (data.output_config.format if data.output_config else None) or data.output_format
    fmt = None
    if spec is not None:
        param = "output_config.format" if data.output_config and data.output_config.format else "output_format"
        check_schema(spec.schema, f"{param}.schema")
        fmt = ResponseFormat("json_schema", spec.schema)
    return _Prompt(messages, _plan(data.tools, data.tool_choice, loaded), _thinking(data), fmt)


def _thinking(data: PromptFields) -> ThinkingControl:
    """`thinking` and `output_config.effort` onto the template's switch and a thinking budget.
    `adaptive`, `between_tools` and newer types leave the switch to the model (and the effort)."""
    effort = data.output_config.effort if data.output_config else None
    config = data.thinking
    if config is not None and (config.type == "enabled" or (config.type is None and config.budget_tokens)):
        return thinking_control(effort=effort, enabled=True, budget=config.budget_tokens)
    disabled = config is not None and config.type == "disabled"
    return thinking_control(effort=effort, enabled=False if disabled else None)


def _plan(tools: list[ToolParam] | None, choice: ToolChoice | None, loaded: set[str]) -> ToolPlan:
    """Custom tools offered to the model; Anthropic's own tools (web search, code execution, its
    versioned bash and editor) are left out, as a deferred tool is until a tool_reference loads it."""
    offered = []
    for i, tool in enumerate(tools or ()):
        if tool.type not in (None, "custom") or (tool.defer_loading and tool.name not in loaded):
            continue
        if tool.input_schema is None:
            raise InvalidRequestError(f"tools[{i}].input_schema is required for a custom tool", param=f"tools[{i}]")
        function = {"name": tool.name, "parameters": tool.input_schema}
        offered.append({"type": "function", "function": function | _described(tool.description)})
    if choice is not None and choice.type == "tool" and not choice.name:
        raise InvalidRequestError("tool_choice of type tool needs a name", param="tool_choice")
    return make_plan(
        tuple(offered) or None,
        _MODES[choice.type] if choice else "auto",
        choice.name if choice else None,
        parallel=not (choice and choice.disable_parallel_tool_use),
    )


def _described(description: str | None) -> dict[str, str]:
    return {"description": description} if description else {}


def _messages(
    system: str | list[TextBlock] | None, messages: list[MessageParam]
) -> tuple[tuple[dict[str, Any], ...], set[str]]:
    """Content blocks as the OpenAI-shaped messages engines take, and the tools that tool_reference
    blocks loaded. Consecutive turns of one role become one turn, as Anthropic combines them; a
    system turn inside the conversation joins the user turn it sits beside (most chat templates
    allow a system message only first, Gemma's none at all)."""
    if not messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")
    out: list[dict[str, Any]] = []
    leading = [system if isinstance(system, str) else _text(system, "system")] if system else []
    loaded: set[str] = set()
    for i, message in enumerate(messages):
        param = f"messages[{i}].content"
        if message.role == "system":
            said = (
                message.content if isinstance(message.content, str) else _text(_blocks(message.content, param), param)
            )
            if out:
                _add(out, {"role": "user", "content": said})
            else:
                leading.append(said)
            continue
        if isinstance(message.content, str):
            _add(out, {"role": message.role, "content": message.content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, raw in enumerate(message.content):
            where = f"{param}[{j}]"
            block = content_block(raw, where)
            if isinstance(block, ToolUseBlock) and message.role == "assistant":
                arguments = json.dumps(block.input, ensure_ascii=False)
                calls.append(
                    {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}}
                )
            elif isinstance(block, ToolResultBlock) and message.role == "user":
                content = (
                    block.content if isinstance(block.content, str) else _result(block.content or [], where, loaded)
                )
                if block.is_error:  # templates have no field for it: say so in the text
                    content = f"Error: {content}"
                _add(out, {"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
            elif isinstance(block, ToolUseBlock | ToolResultBlock):
                raise InvalidRequestError(
                    f"{where}: a {block.__struct_config__.tag} block in a {message.role} message", param=where
                )
            elif (text := _rendered(block, raw, where, loaded)) is not None:
                texts.append(text)
        if message.role == "assistant":
            _add(out, {"role": "assistant", "content": "\n\n".join(texts)} | ({"tool_calls": calls} if calls else {}))
        elif texts:
            _add(out, {"role": "user", "content": "\n\n".join(texts)})
    if leading:
        out.insert(0, {"role": "system", "content": "\n\n".join(leading)})
    return tuple(out), loaded


def _add(out: list[dict[str, Any]], message: dict[str, Any]) -> None:
    """Append, merging into the last turn when it has the same role (never a tool result)."""
    last = out[-1] if out else None
    if last is None or last["role"] != message["role"] or message["role"] == "tool":
        out.append(message)
        return
    text = "\n\n".join(t for t in (last["content"], message["content"]) if t)
    calls = [*last.get("tool_calls", ()), *message.get("tool_calls", ())]
    out[-1] = {"role": message["role"], "content": text} | ({"tool_calls": calls} if calls else {})


def _blocks(raw: list[dict[str, Any]], param: str) -> list[Any]:
    return [content_block(b, f"{param}[{j}]") for j, b in enumerate(raw)]


def _rendered(block: Any, raw: dict[str, Any], where: str, loaded: set[str]) -> str | None:
    """A block's text in the prompt; None for a block left out. Images and documents we cannot
    read are refused: an answer that never saw them would mislead."""
    if isinstance(block, TextBlock):
        return block.text
    if isinstance(block, ImageBlock):
        raise InvalidRequestError(f"{where} is an image block: this server's models read text only", param=where)
    if isinstance(block, DocumentBlock):
        return _document(block, where)
    if isinstance(block, SearchResultBlock):
        return "\n".join([f"{block.title} ({block.source})", *(b.text for b in block.content)])
    if isinstance(block, ToolReferenceBlock):
        loaded.add(block.tool_name)
        return f"Tool loaded: {block.tool_name}"
    if isinstance(block, ThinkingBlock) or (isinstance(block, str) and block in _LEFT_OUT):
        return None
    # A block newer than this server: its text when it has one (a compaction's summary), else nothing.
    for key in ("text", "content"):
        if isinstance(raw.get(key), str):
            return str(raw[key])
    return None


def _document(block: DocumentBlock, where: str) -> str:
    source = block.source
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        body = source["data"]
    elif source.get("type") == "content":
        inner = source.get("content")
        body = inner if isinstance(inner, str) else _text(_blocks(inner or [], f"{where}.source.content"), where)
    else:
        kind = source.get("type")
        raise InvalidRequestError(
            f"{where} is a document with a {kind} source: this server reads plain-text documents only", param=where
        )
    head = [h for h in (block.title, block.context) if h]
    return "\n\n".join([*head, body])


def _result(content: list[dict[str, Any]], where: str, loaded: set[str]) -> str:
    """A tool result's blocks as one text."""
    texts = []
    for k, raw in enumerate(content):
        inner = f"{where}.content[{k}]"
        if (text := _rendered(content_block(raw, inner), raw, inner, loaded)) is not None:
            texts.append(text)
    return "\n\n".join(texts)


def _text(blocks: list[Any], param: str) -> str:
    for j, block in enumerate(blocks):
        if not isinstance(block, TextBlock):
            kind = block if isinstance(block, str) else block.__struct_config__.tag
            raise InvalidRequestError(f"{param}[{j}] is a {kind} block; only text is supported here", param=param)
    return "\n\n".join(b.text for b in blocks)


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


def _events(generation: Generation, stream: Any, first: Chunk, mid: str, model: str, answer: Answer) -> Any:
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
        cached = usage.cached_tokens if usage else 0
        return [
            *events,
            {
                "type": "message_delta",
                "delta": {"stop_reason": _stop_reason(part, bool(found)), "stop_sequence": part.stop_sequence},
                "usage": {
                    "input_tokens": usage.prompt_tokens - cached if usage else 0,
                    "output_tokens": usage.completion_tokens if usage else 0,
                    "cache_read_input_tokens": cached,
                    "cache_creation_input_tokens": 0,
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
            "usage": {
                "input_tokens": 0,
                "output_tokens": 0,
                "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0,
            },
        },
    }
    return event_stream(
        stream,
        first,
        opening=[opening],
        piece=piece,
        usage_event=None,
        drain=generation.drain,
        frame=named_sse,
        error=_error,
        done=b"",
    )
