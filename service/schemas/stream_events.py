"""The typed events of the two named-event streams: OpenAI's Responses API (`response.*`, each with
a `sequence_number`) and Anthropic's Messages API (`message_start` ... `message_stop`). Each is
written as `event: <type>` and `data: <json>`; fields are declared in the order clients have
always received them."""

from __future__ import annotations

from typing import Literal

import msgspec

from service.schemas.common import TokenLogprob
from service.schemas.messages import MessageUsage, TextBlock, ThinkingBlock, ToolUseBlock
from service.schemas.responses import OutputItem, OutputText, Response, SummaryText

_encode = msgspec.json.Encoder().encode


class NamedEvent(msgspec.Struct, tag_field="type"):
    """An event whose `type` (its tag) also names its SSE frame."""


def named_frame(event: NamedEvent) -> bytes:
    name = str(event.__struct_config__.tag)
    return b"event: " + name.encode() + b"\ndata: " + _encode(event) + b"\n\n"


# -- Responses API -------------------------------------------------------------------------------


class ResponseEvent(NamedEvent):
    sequence_number: int


class ResponseCreated(ResponseEvent, tag="response.created"):
    response: Response


class ResponseInProgress(ResponseEvent, tag="response.in_progress"):
    response: Response


class ResponseCompleted(ResponseEvent, tag="response.completed"):
    response: Response


class ResponseIncomplete(ResponseEvent, tag="response.incomplete"):
    response: Response


class OutputItemAdded(ResponseEvent, tag="response.output_item.added"):
    output_index: int
    item: OutputItem


class OutputItemDone(ResponseEvent, tag="response.output_item.done"):
    output_index: int
    item: OutputItem


class _OfItem(ResponseEvent):
    item_id: str
    output_index: int


class _OfContent(_OfItem):
    content_index: int


class _OfSummary(_OfItem):
    summary_index: int


class ContentPartAdded(_OfContent, tag="response.content_part.added"):
    part: OutputText


class ContentPartDone(_OfContent, tag="response.content_part.done"):
    part: OutputText


class OutputTextDelta(_OfContent, tag="response.output_text.delta"):
    delta: str
    logprobs: list[TokenLogprob]


class OutputTextDone(_OfContent, tag="response.output_text.done"):
    text: str
    logprobs: list[TokenLogprob]


class ReasoningTextDelta(_OfContent, tag="response.reasoning_text.delta"):
    delta: str


class ReasoningTextDone(_OfContent, tag="response.reasoning_text.done"):
    text: str


class SummaryPartAdded(_OfSummary, tag="response.reasoning_summary_part.added"):
    part: SummaryText


class SummaryTextDelta(_OfSummary, tag="response.reasoning_summary_text.delta"):
    delta: str


class SummaryTextDone(_OfSummary, tag="response.reasoning_summary_text.done"):
    text: str


class SummaryPartDone(_OfSummary, tag="response.reasoning_summary_part.done"):
    part: SummaryText


class ArgumentsDelta(_OfItem, tag="response.function_call_arguments.delta"):
    delta: str


class ArgumentsDone(_OfItem, tag="response.function_call_arguments.done"):
    name: str
    arguments: str


class CustomInputDelta(_OfItem, tag="response.custom_tool_call_input.delta"):
    delta: str


class CustomInputDone(_OfItem, tag="response.custom_tool_call_input.done"):
    input: str


class ResponseError(ResponseEvent, tag="error"):
    code: str
    message: str
    param: str | None


# -- Messages API (Anthropic) --------------------------------------------------------------------

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class StartedMessage(msgspec.Struct, kw_only=True):
    """`message_start`'s message: nothing said yet."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ThinkingBlock | TextBlock | ToolUseBlock] = msgspec.field(default_factory=list)
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: MessageUsage = msgspec.field(default_factory=lambda: MessageUsage(0, 0))


class TextDelta(msgspec.Struct, tag_field="type", tag="text_delta"):
    text: str


class ThinkingDelta(msgspec.Struct, tag_field="type", tag="thinking_delta"):
    thinking: str


class InputJsonDelta(msgspec.Struct, tag_field="type", tag="input_json_delta"):
    partial_json: str


class StopDelta(msgspec.Struct):
    stop_reason: StopReason
    stop_sequence: str | None


class ErrorDetail(msgspec.Struct):
    type: str
    message: str


class MessageStart(NamedEvent, tag="message_start"):
    message: StartedMessage


class ContentBlockStart(NamedEvent, tag="content_block_start"):
    index: int
    content_block: ThinkingBlock | TextBlock | ToolUseBlock


class ContentBlockDelta(NamedEvent, tag="content_block_delta"):
    index: int
    delta: ThinkingDelta | TextDelta | InputJsonDelta


class ContentBlockStop(NamedEvent, tag="content_block_stop"):
    index: int


class MessageDelta(NamedEvent, tag="message_delta"):
    delta: StopDelta
    usage: MessageUsage


class MessageStop(NamedEvent, tag="message_stop"):
    pass


class MessageError(NamedEvent, tag="error"):
    error: ErrorDetail


MessageEvent = MessageStart | ContentBlockStart | ContentBlockDelta | ContentBlockStop | MessageDelta | MessageStop
