"""Anthropic's Messages API wire types (`/v1/messages`), as the `anthropic` SDK and Claude Code send them.

Content blocks arrive as plain objects: agents put block types in history that are newer than any
schema (`tool_reference`, `server_tool_use`, `container_upload`...), and one unknown `type` must not
fail the whole request. `content_block` turns the ones we read into the structs below; the
controller decides what the rest become in the prompt.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from kernel.config import AdapterName
from kernel.errors import InvalidRequestError
from service.schemas.common import MaxTokens, TopK, TopP


class TextBlock(msgspec.Struct, tag_field="type", tag="text", kw_only=True):
    text: str


class ImageBlock(msgspec.Struct, tag_field="type", tag="image", kw_only=True):
    source: dict[str, Any]


class DocumentBlock(msgspec.Struct, tag_field="type", tag="document", kw_only=True):
    source: dict[str, Any]
    title: str | None = None
    context: str | None = None


class SearchResultBlock(msgspec.Struct, tag_field="type", tag="search_result", kw_only=True):
    content: list[TextBlock]
    source: str
    title: str


class ToolReferenceBlock(msgspec.Struct, tag_field="type", tag="tool_reference", kw_only=True):
    """A tool search's answer: the tool named is now loaded (its `defer_loading` no longer applies)."""

    tool_name: str


class ToolUseBlock(msgspec.Struct, tag_field="type", tag="tool_use", kw_only=True):
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(msgspec.Struct, tag_field="type", tag="tool_result", kw_only=True):
    tool_use_id: str
    content: str | list[dict[str, Any]] | None = None  # text, image, document, search_result, tool_reference...
    is_error: bool = False


class ThinkingBlock(msgspec.Struct, tag_field="type", tag="thinking", kw_only=True):
    """A reasoning model's thinking. Ours carry an empty signature: nothing here is encrypted."""

    thinking: str
    signature: str = ""


Block = (
    TextBlock
    | ImageBlock
    | DocumentBlock
    | SearchResultBlock
    | ToolReferenceBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
)
_KNOWN = {"text", "image", "document", "search_result", "tool_reference", "tool_use", "tool_result", "thinking"}


def content_block(raw: dict[str, Any], param: str) -> Block | str:
    """A block we read as its struct; any other block as its `type` (the caller decides)."""
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise InvalidRequestError(f"{param}.type must be a string", param=param)
    if kind not in _KNOWN:
        return kind
    try:
        block: Block = msgspec.convert(raw, Block)
        return block
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(f"Invalid {kind} block at {param}: {exc}", param=param) from None


class MessageParam(msgspec.Struct, kw_only=True):
    # "system": a system turn inside the conversation (Claude Code sends its environment so).
    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, Any]]


class ToolParam(msgspec.Struct, kw_only=True):
    """A custom tool (`type` absent or "custom"), or one of Anthropic's own tools (a dated `type`
    such as `web_search_20250305`), which we leave out of the prompt."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    input_schema: dict[str, Any] | None = None
    description: str | None = None
    type: str | None = None
    defer_loading: bool = False  # offered only once a tool_reference in the history loaded it


class ToolChoice(msgspec.Struct, kw_only=True):
    type: Literal["auto", "any", "tool", "none"] = "auto"
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(msgspec.Struct, kw_only=True):
    # "enabled", "disabled", "adaptive", "between_tools"; a newer type (or none) is the model's default
    type: str | None = None
    budget_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    display: str | None = None  # "summarized" or "omitted": a display preference


class OutputFormat(msgspec.Struct, kw_only=True):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class OutputConfig(msgspec.Struct, kw_only=True):
    effort: str | None = None  # low, medium, high, xhigh, max (newer levels: the model's default)
    format: OutputFormat | None = None


class MessageMetadata(msgspec.Struct, kw_only=True):
    user_id: Annotated[str, msgspec.Meta(max_length=1024)] | None = None


class PromptFields(msgspec.Struct, kw_only=True):
    """What makes the prompt: shared by `/v1/messages` and `/v1/messages/count_tokens`."""

    model: str
    messages: Annotated[list[MessageParam], msgspec.Meta(max_length=100_000)]
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[ToolParam], msgspec.Meta(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's name for output_config.format
    mcp_servers: list[dict[str, Any]] | None = None  # refused when not empty: we call no MCP server
    metadata: MessageMetadata | None = None  # `user_id`: a remote tier's affinity; nothing stored


class CountTokensRequest(PromptFields, kw_only=True):
    pass


class MessagesRequest(PromptFields, kw_only=True):
    max_tokens: MaxTokens
    adapter: AdapterName | None = None  # a LoRA adapter of the tier (or `model: "<tier>:<adapter>"`)
    stop_sequences: Annotated[list[str], msgspec.Meta(max_length=16)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    stream: bool = False


class CountTokensResponse(msgspec.Struct):
    input_tokens: int


class MessageUsage(msgspec.Struct):
    """Anthropic's split: `input_tokens` are the ones not read from the cache, so the prompt is
    `input_tokens + cache_read_input_tokens + cache_creation_input_tokens`."""

    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class Message(msgspec.Struct):
    id: str
    model: str
    content: list[ThinkingBlock | TextBlock | ToolUseBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None
    usage: MessageUsage
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
