"""The Messages API's request side: Anthropic's content blocks as the OpenAI-shaped messages
engines take (`tool_use`/`tool_result` as tool calls and results), its tools as the tool plan,
`thinking` and `output_config` as the thinking switch and the output grammar. Shared by
`/v1/messages` and `/v1/messages/count_tokens`.

What Claude Code sends is the yardstick (docs/api.md lists each field's treatment): system turns
inside `messages`, custom tools without a `type` beside Anthropic's own tools (left out of the
prompt), history blocks of Anthropic-side work (left out), `thinking` and `output_config.effort`
(mapped through `service.serving.thinking`), beta fields and headers (hints)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from backends.base import IMAGE_MARKER, ResponseFormat
from kernel.config import TierSettings
from kernel.errors import InvalidRequestError
from service.schemas.messages import (
    Block,
    DocumentBlock,
    ImageBlock,
    MessageParam,
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
from service.serving.images import ImagePart, check_images
from service.serving.schema_limits import check_schema
from service.serving.thinking import ThinkingControl, thinking_control
from service.serving.tool_calls import ToolMode, ToolPlan, make_plan

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


@dataclass(slots=True)
class _Found:
    """What the blocks brought besides text: tools a tool_reference loaded, and the images in order."""

    tools: set[str] = field(default_factory=set)
    images: list[ImagePart] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class MessagePrompt:
    messages: tuple[dict[str, Any], ...]
    images: list[ImagePart]  # one per IMAGE_MARKER in the messages' text
    plan: ToolPlan
    thinking: ThinkingControl
    format: ResponseFormat | None  # output_config.format's grammar


def message_prompt(data: PromptFields, tier: TierSettings) -> MessagePrompt:
    """Everything of a request that shapes the prompt, as the engine request takes it; an image
    block to a text-only tier is a 400 naming it."""
    if data.mcp_servers:
        raise InvalidRequestError(
            "mcp_servers is not supported: this server cannot call MCP servers (offer their tools as custom tools)",
            param="mcp_servers",
        )
    messages, found = _messages(data.system, data.messages)
    check_images(messages, found.images, tier)
    spec = (data.output_config.format if data.output_config else None) or data.output_format
    fmt = None
    if spec is not None:
        param = "output_config.format" if data.output_config and data.output_config.format else "output_format"
        check_schema(spec.schema, f"{param}.schema")
        fmt = ResponseFormat("json_schema", spec.schema)
    return MessagePrompt(messages, found.images, _plan(data.tools, data.tool_choice, found.tools), _thinking(data), fmt)


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
) -> tuple[tuple[dict[str, Any], ...], _Found]:
    """Content blocks as the OpenAI-shaped messages engines take, and the tools that tool_reference
    blocks loaded. Consecutive turns of one role become one turn, as Anthropic combines them; a
    system turn inside the conversation joins the user turn it sits beside (most chat templates
    allow a system message only first, Gemma's none at all)."""
    if not messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")
    out: list[dict[str, Any]] = []
    leading = [system if isinstance(system, str) else _text(system, "system")] if system else []
    found = _Found()
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
        else:
            _turn(out, message.role, message.content, param, found)
    if leading:
        out.insert(0, {"role": "system", "content": "\n\n".join(leading)})
    return tuple(out), found


def _turn(
    out: list[dict[str, Any]],
    role: Literal["user", "assistant"],
    blocks: list[dict[str, Any]],
    param: str,
    found: _Found,
) -> None:
    """A user or assistant turn's blocks: its text, an assistant's tool calls, a user's tool results
    (each its own tool message, before the turn's text)."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, raw in enumerate(blocks):
        where = f"{param}[{j}]"
        block = content_block(raw, where)
        if isinstance(block, ToolUseBlock) and role == "assistant":
            arguments = json.dumps(block.input, ensure_ascii=False)
            calls.append({"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}})
        elif isinstance(block, ToolResultBlock) and role == "user":
            content = block.content if isinstance(block.content, str) else _result(block.content or [], where, found)
            if block.is_error:  # templates have no field for it: say so in the text
                content = f"Error: {content}"
            _add(out, {"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
        elif isinstance(block, ToolUseBlock | ToolResultBlock):
            raise InvalidRequestError(
                f"{where}: a {block.__struct_config__.tag} block in a {role} message", param=where
            )
        elif (text := _rendered(block, raw, where, found)) is not None:
            texts.append(text)
    if role == "assistant":
        _add(out, {"role": "assistant", "content": "\n\n".join(texts)} | ({"tool_calls": calls} if calls else {}))
    elif texts:
        _add(out, {"role": "user", "content": "\n\n".join(texts)})


def _add(out: list[dict[str, Any]], message: dict[str, Any]) -> None:
    """Append, merging into the last turn when it has the same role (never a tool result)."""
    last = out[-1] if out else None
    if last is None or last["role"] != message["role"] or message["role"] == "tool":
        out.append(message)
        return
    text = "\n\n".join(t for t in (last["content"], message["content"]) if t)
    calls = [*last.get("tool_calls", ()), *message.get("tool_calls", ())]
    out[-1] = {"role": message["role"], "content": text} | ({"tool_calls": calls} if calls else {})


def _blocks(raw: list[dict[str, Any]], param: str) -> list[Block | str]:
    return [content_block(b, f"{param}[{j}]") for j, b in enumerate(raw)]


def _rendered(block: Block | str, raw: dict[str, Any], where: str, found: _Found) -> str | None:
    """A block's text in the prompt (an image's: its marker); None for a block left out. Documents
    we cannot read are refused: an answer that never saw them would mislead."""
    if isinstance(block, TextBlock):
        return block.text
    if isinstance(block, ImageBlock):
        found.images.append(ImagePart(_image_url(block, where), where))
        return IMAGE_MARKER
    if isinstance(block, DocumentBlock):
        return _document(block, where)
    if isinstance(block, SearchResultBlock):
        return "\n".join([f"{block.title} ({block.source})", *(b.text for b in block.content)])
    if isinstance(block, ToolReferenceBlock):
        found.tools.add(block.tool_name)
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


def _image_url(block: ImageBlock, where: str) -> str:
    """An image block's source as a URL: base64 as a data URL, a `url` source as it is."""
    source = block.source
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        return f"data:{source.get('media_type') or 'image/png'};base64,{source['data']}"
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return str(source["url"])
    raise InvalidRequestError(
        f"{where}: an image needs a base64 or url source, not {source.get('type')!r}", param=where
    )


def _result(content: list[dict[str, Any]], where: str, found: _Found) -> str:
    """A tool result's blocks as one text."""
    texts = []
    for k, raw in enumerate(content):
        inner = f"{where}.content[{k}]"
        if (text := _rendered(content_block(raw, inner), raw, inner, found)) is not None:
            texts.append(text)
    return "\n\n".join(texts)


def _text(blocks: Sequence[Block | str], param: str) -> str:
    texts = []
    for j, block in enumerate(blocks):
        if not isinstance(block, TextBlock):
            kind = block if isinstance(block, str) else block.__struct_config__.tag
            raise InvalidRequestError(f"{param}[{j}] is a {kind} block; only text is supported here", param=param)
        texts.append(block.text)
    return "\n\n".join(texts)
