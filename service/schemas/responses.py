"""OpenAI's Responses API wire types (`POST /v1/responses`), stateless: what the openai SDK's
`responses.create` and agents built on it (the Agents SDK, Codex CLI) send and read."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from kernel.config import AdapterName
from service.schemas.chat import FunctionSpec
from service.schemas.common import MaxTokens, Seed, Temperature, TopP


class ContentPart(msgspec.Struct, kw_only=True):
    type: str  # input_text and output_text are read; anything else (images, files) is refused
    text: str | None = None


class InputItem(msgspec.Struct, kw_only=True):
    """One item of `input`, every kind in one shape (a message may come without `type`)."""

    type: Literal["message", "function_call", "function_call_output", "reasoning", "item_reference"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ContentPart] | None = None  # message
    call_id: str | None = None  # function_call, function_call_output
    name: str | None = None  # function_call
    arguments: str | None = None  # function_call
    output: str | list[ContentPart] | None = None  # function_call_output
    id: str | None = None
    status: str | None = None


class FunctionTool(msgspec.Struct, kw_only=True):
    type: str  # "function"; the hosted tools (web_search, file_search...) are OpenAI's, not ours
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")] | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def function(self) -> FunctionSpec:
        assert self.name is not None
        return FunctionSpec(name=self.name, description=self.description, parameters=self.parameters)


class NamedTool(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    name: str


class TextFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, kw_only=True):
    format: TextFormat = msgspec.field(default_factory=TextFormat)


class ReasoningConfig(msgspec.Struct, kw_only=True):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str
    adapter: AdapterName | None = None  # a LoRA adapter of the tier (or `model: "<tier>:<adapter>"`)
    input: str | Annotated[list[InputItem], msgspec.Meta(max_length=4096)]
    instructions: str | None = None
    tools: Annotated[list[FunctionTool], msgspec.Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    seed: Seed | None = None  # not in OpenAI's API; llama-server and vLLM clients send it
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    include: list[str] | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: Annotated[dict[str, str], msgspec.Meta(max_length=16)] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None


class OutputText(msgspec.Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class ReasoningText(msgspec.Struct, tag_field="type", tag="reasoning_text"):
    text: str


class OutputMessage(msgspec.Struct, tag_field="type", tag="message"):
    id: str
    content: list[OutputText]
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"


class OutputFunctionCall(msgspec.Struct, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class OutputReasoning(msgspec.Struct, tag_field="type", tag="reasoning"):
    """A reasoning model's thinking, as text (nothing here is encrypted or summarised)."""

    id: str
    content: list[ReasoningText]
    summary: list[Any] = msgspec.field(default_factory=list)
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = OutputReasoning | OutputMessage | OutputFunctionCall


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails


class IncompleteDetails(msgspec.Struct):
    reason: Literal["max_output_tokens"]


class Response(msgspec.Struct, kw_only=True):
    id: str
    created_at: int
    model: str
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    output: list[OutputItem]
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    text: dict[str, Any]
    object: Literal["response"] = "response"
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: dict[str, Any] | None = None
    previous_response_id: None = None
    store: bool = False  # stateless: nothing is kept to be retrieved or continued later
    truncation: Literal["disabled"] = "disabled"
    reasoning: dict[str, Any] | None = None
    user: str | None = None
