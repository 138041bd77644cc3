"""Anthropic's Messages API wire types (`/v1/messages`), as the `anthropic` SDK and Claude Code send them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from kernel.config import AdapterName
from service.schemas.common import MaxTokens, TopK, TopP


class TextBlock(msgspec.Struct, tag_field="type", tag="text", kw_only=True):
    text: str


class ImageBlock(msgspec.Struct, tag_field="type", tag="image", kw_only=True):
    source: dict[str, Any]


class DocumentBlock(msgspec.Struct, tag_field="type", tag="document", kw_only=True):
    source: dict[str, Any]


class ToolUseBlock(msgspec.Struct, tag_field="type", tag="tool_use", kw_only=True):
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(msgspec.Struct, tag_field="type", tag="tool_result", kw_only=True):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock] | None = None
    is_error: bool = False


class ThinkingBlock(msgspec.Struct, tag_field="type", tag="thinking", kw_only=True):
    """A reasoning model's thinking. Ours carry an empty signature: nothing here is encrypted."""

    thinking: str
    signature: str = ""


Block = TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock


class MessageParam(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolParam(msgspec.Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    input_schema: dict[str, Any]
    description: str | None = None
    type: str | None = None  # "custom" or absent; Anthropic's server tools (web search...) are not ours


class ToolChoice(msgspec.Struct, kw_only=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(msgspec.Struct, kw_only=True):
    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = None


class MessagesRequest(msgspec.Struct, kw_only=True):
    model: str
    adapter: AdapterName | None = None  # a LoRA adapter of the tier (or `model: "<tier>:<adapter>"`)
    max_tokens: MaxTokens
    messages: list[MessageParam]
    system: str | list[TextBlock] | None = None
    stop_sequences: Annotated[list[str], msgspec.Meta(max_length=16)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    stream: bool = False
    tools: Annotated[list[ToolParam], msgspec.Meta(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    metadata: dict[str, Any] | None = None


class CountTokensRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[MessageParam]
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[ToolParam], msgspec.Meta(max_length=128)] | None = None


class CountTokensResponse(msgspec.Struct):
    input_tokens: int


class MessageUsage(msgspec.Struct):
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
