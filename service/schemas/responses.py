"""OpenAI's Responses API wire types (`/v1/responses`): what the openai SDK's
`responses.create` and agents built on it (the Agents SDK, Codex CLI) send and read."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from kernel.config import AdapterName
from service.schemas.chat import FunctionSpec
from service.schemas.common import MaxTokens, Seed, Temperature, TopP


class ContentPart(msgspec.Struct, kw_only=True):
    type: str  # input_text, output_text and input_image are read; files are refused by name
    text: str | None = None
    image_url: str | None = None  # input_image: a data URL, or http(s) with ALLOW_REMOTE_IMAGES
    detail: str | None = None  # input_image: a hint (the projector decides the resolution)


class InputItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One item of `input`, every kind in one shape (a message may come without `type`); the kinds
    the controller reads are listed there, any other is refused by name."""

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ContentPart] | None = None  # message
    call_id: str | None = None  # function_call(_output), custom_tool_call(_output), local_shell_call
    name: str | None = None  # function_call, custom_tool_call
    namespace: str | None = None  # function_call of a namespace tool (Codex)
    arguments: str | None = None  # function_call
    input: str | None = None  # custom_tool_call: the freeform text
    action: dict[str, Any] | None = None  # local_shell_call: {"type": "exec", "command": [...]}
    output: str | list[ContentPart] | None = None  # *_output
    id: str | None = None
    status: str | None = None


class ToolDef(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A tool of any type: `function`, `namespace` (functions grouped under a name, as Codex sends),
    `custom` (freeform text input, optionally a grammar), `local_shell`; hosted tools
    (`web_search`, `file_search`...) are OpenAI's own and stay out of the prompt."""

    type: str
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")] | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    format: dict[str, Any] | None = None  # custom: {"type": "text"} or {"type": "grammar", ...}
    tools: Annotated[list[ToolDef], msgspec.Meta(max_length=128)] | None = None  # namespace

    def function(self, name: str | None = None) -> FunctionSpec:
        assert self.name is not None
        return FunctionSpec(name=name or self.name, description=self.description, parameters=self.parameters)


class NamedTool(msgspec.Struct, kw_only=True):
    type: Literal["function", "custom"]
    name: str


class TextFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, kw_only=True):
    format: TextFormat = msgspec.field(default_factory=TextFormat)
    verbosity: Literal["low", "medium", "high"] | None = None  # a hint: the model has no such knob


class ReasoningConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    effort: str | None = None  # none, minimal, low, medium, high, xhigh: mapped by service.serving.thinking
    summary: str | None = None  # auto, concise, detailed: a hint (reasoning comes back whole)
    generate_summary: str | None = None  # the older name of summary


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str
    adapter: AdapterName | None = None  # a LoRA adapter of the tier (or `model: "<tier>:<adapter>"`)
    input: str | Annotated[list[InputItem], msgspec.Meta(max_length=4096)]
    instructions: str | None = None
    tools: Annotated[list[ToolDef], msgspec.Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    seed: Seed | None = None  # not in OpenAI's API; llama-server and vLLM clients send it
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    include: list[str] | None = None
    stream: bool = False
    store: bool | None = None  # None: RESPONSES_STORE_DEFAULT
    previous_response_id: str | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    metadata: Annotated[dict[str, str], msgspec.Meta(max_length=16)] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    # Hints: they cannot change what the answer means.
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    client_metadata: dict[str, Any] | None = None


class OutputText(msgspec.Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class ReasoningText(msgspec.Struct, tag_field="type", tag="reasoning_text"):
    text: str


class SummaryText(msgspec.Struct, tag_field="type", tag="summary_text"):
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
    namespace: str | None = None  # the namespace tool `name` belongs to


class OutputCustomToolCall(msgspec.Struct, tag_field="type", tag="custom_tool_call"):
    """A call of a `custom` (freeform) tool: its input is plain text, not JSON arguments."""

    id: str
    call_id: str
    name: str
    input: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    namespace: str | None = None


class ShellAction(msgspec.Struct, tag_field="type", tag="exec"):
    command: list[str]
    env: dict[str, str] = msgspec.field(default_factory=dict)
    working_directory: str | None = None
    timeout_ms: int | None = None


class OutputLocalShellCall(msgspec.Struct, tag_field="type", tag="local_shell_call"):
    id: str
    call_id: str
    action: ShellAction
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class OutputReasoning(msgspec.Struct, tag_field="type", tag="reasoning"):
    """A reasoning model's thinking, as text (nothing here is encrypted or summarised)."""

    id: str
    content: list[ReasoningText]
    summary: list[SummaryText] = msgspec.field(default_factory=list)
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = OutputReasoning | OutputMessage | OutputFunctionCall | OutputCustomToolCall | OutputLocalShellCall


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0  # prompt tokens whose KV was reused from an earlier request
    cache_write_tokens: int = 0  # nothing is billed for caching: the KV is kept as a side effect


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
    previous_response_id: str | None = None
    store: bool = False  # kept for GET and previous_response_id (see service.serving.response_store)
    truncation: Literal["auto", "disabled"] = "disabled"
    reasoning: dict[str, Any] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None


class DeletedResponse(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class InputItemList(msgspec.Struct, kw_only=True):
    """`GET /v1/responses/{id}/input_items`: OpenAI's cursor page (newest first by default)."""

    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"
