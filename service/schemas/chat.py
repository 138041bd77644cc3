from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from service.schemas.common import MaxTokens, SamplingFields, TokenLogprob, UsageInfo

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


# Content parts a model reads: text, and images where the tier has a projector (service.serving.images);
# audio and files are refused, never dropped.
TEXT_PARTS = ("text", "refusal")
READ_PARTS = (*TEXT_PARTS, "image_url")


class ImageUrl(msgspec.Struct, kw_only=True):
    url: str  # a data URL, or http(s) with ALLOW_REMOTE_IMAGES
    detail: str | None = None  # low/high/auto: a hint (the projector decides the resolution)


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None
    refusal: str | None = None  # an assistant turn's refusal part, sent back in history
    image_url: ImageUrl | str | None = None  # a bare string is the older form


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str  # JSON text


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class FunctionSpec(msgspec.Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None  # a legacy assistant turn's call

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join((p.text if p.type == "text" else p.refusal) or "" for p in self.content if p.type in TEXT_PARTS)

    def unreadable_part(self) -> int | None:
        """The index of the first content part that is neither text nor an image (audio, a file)."""
        if isinstance(self.content, list):
            return next((j for j, p in enumerate(self.content) if p.type not in READ_PARTS), None)
        return None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: MaxTokens | None = None
    tools: Annotated[list[ToolSpec], msgspec.Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    # Reasoning controls (service.serving.thinking): OpenAI's effort level (a name newer than ours is a
    # hint) and vLLM/llama-server's template variables, e.g. {"enable_thinking": false}.
    reasoning_effort: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Output kinds: text is all these models make (audio output is refused, not silently skipped).
    modalities: Annotated[list[str], msgspec.Meta(max_length=8)] | None = None
    audio: dict[str, Any] | None = None
    # Function calling before `tools` (service.serving.generation.legacy_functions maps it onto tools).
    functions: Annotated[list[FunctionSpec], msgspec.Meta(max_length=128)] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None


class AssistantMessage(msgspec.Struct):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None
    refusal: None = None
    # A reasoning model's thinking, under both names clients read (vLLM/DeepSeek's and OpenRouter's).
    reasoning_content: str | None = None
    reasoning: str | None = None
    function_call: FunctionCall | None = None  # the call, for a request in the legacy `functions` form


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprob] | None
    refusal: None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None


class FunctionDelta(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    """A streamed tool call: `id`, `type` and the name come once, then pieces of `arguments`."""

    index: int
    function: FunctionDelta
    id: str | None = None
    type: Literal["function"] | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    function_call: FunctionDelta | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: UsageInfo | None = None
