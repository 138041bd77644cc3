"""Tool calling for chat requests: what the engine is asked for, and tool calls out of its text.

`tool_choice` "auto" (the default with tools) offers the tools and parses whatever calls the model
writes, in its tier's format; "required" or a named function also holds the model to a grammar of
exactly one call (`backends.tools.forced_call_schema`), so even a weak model returns a call whose
arguments match the schema; "none" offers no tools. While streaming, text that may begin a call is
held back, and the calls go out as OpenAI-shaped deltas at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from backends.base import ResponseFormat
from backends.tools import START_MARKERS, ToolCall, ToolFormat, forced_call_schema, parse_forced, parse_tool_calls
from kernel.errors import InvalidRequestError
from service.ids import new_id
from service.schemas.chat import (
    ChatCompletionRequest,
    FunctionCall,
    FunctionDelta,
    NamedToolChoice,
    ToolCallDelta,
    ToolSpec,
)
from service.schemas.chat import ToolCall as WireToolCall
from service.serving.schema_limits import check_schema

ToolMode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a chat request asks of tool calling."""

    tools: tuple[dict[str, Any], ...] | None  # offered to the model; None for no tools
    forced: ResponseFormat | None  # the grammar of one call, for "required" or a named function
    parallel: bool

    @property
    def active(self) -> bool:
        return self.tools is not None


def plan_tools(data: ChatCompletionRequest) -> ToolPlan:
    choice = data.tool_choice
    mode: ToolMode = "named" if isinstance(choice, NamedToolChoice) else (choice or "auto")
    name = choice.function.name if isinstance(choice, NamedToolChoice) else None
    return make_plan(
        tool_dicts(data.tools) if data.tools else None,
        mode,
        name,
        parallel=data.parallel_tool_calls is not False,
        constrained=data.response_format is not None and data.response_format.type != "text",
    )


def make_plan(
    tools: tuple[dict[str, Any], ...] | None,
    mode: ToolMode,
    name: str | None = None,
    *,
    parallel: bool = True,
    constrained: bool = False,
) -> ToolPlan:
    """The plan for OpenAI-shaped `tools` under a tool choice (`name` for "named"); `constrained`:
    the request already holds the output to a response format."""
    if not tools:
        if mode not in ("none", "auto"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return ToolPlan(None, None, parallel)
    if mode == "none":
        return ToolPlan(None, None, parallel)
    forced = None
    if mode in ("required", "named"):
        if name is not None and name not in {t["function"]["name"] for t in tools}:
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        if constrained:
            raise InvalidRequestError(
                "response_format cannot be combined with a required tool call", param="response_format"
            )
        schema = forced_call_schema(tools, name)
        check_schema(schema, "tools")  # compiled into a grammar: bounded like response_format
        forced = ResponseFormat("json_schema", schema)
    return ToolPlan(tools, forced, parallel)


def tool_dicts(tools: list[ToolSpec]) -> tuple[dict[str, Any], ...]:
    """Tool definitions as chat templates take them (OpenAI's shape, unset fields left out)."""
    return tuple(
        {"type": "function", "function": {k: v for k, v in msgspec.structs.asdict(t.function).items() if v is not None}}
        for t in tools
    )


class ToolCallFilter:
    """Splits a model's streamed text into content to send now and tool calls found at the end."""

    def __init__(self, fmt: ToolFormat, plan: ToolPlan) -> None:
        self._fmt = fmt
        self._plan = plan
        self._markers = START_MARKERS[fmt]
        self._held = ""  # text that is, or may become, a tool call
        self._capturing = plan.forced is not None
        self._decided = False  # llama3: the answer did not start with a call

    def feed(self, text: str) -> str:
        """Text safe to send as content now."""
        self._held += text
        if self._capturing:
            return ""
        if self._fmt == "llama3":  # bare JSON: a call only when the answer starts with one
            head = self._held.lstrip()
            if not self._decided:
                if any(head.startswith(m) for m in self._markers):
                    self._capturing = True
                    return ""
                if not head or any(m.startswith(head) for m in self._markers):
                    return ""  # may still become a marker
                self._decided = True
            return self._release(len(self._held))
        starts = [i for i in (self._held.find(m) for m in self._markers) if i >= 0]
        if starts:
            self._capturing = True
            return self._release(min(starts))
        keep = 0  # the longest tail that could still grow into a marker
        for marker in self._markers:
            for n in range(min(len(marker) - 1, len(self._held)), 0, -1):
                if marker.startswith(self._held[-n:]):
                    keep = max(keep, n)
                    break
        return self._release(len(self._held) - keep)

    def _release(self, cut: int) -> str:
        out, self._held = self._held[:cut], self._held[cut:]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The rest of the content (text held back that was no call after all) and the calls."""
        held, self._held = self._held, ""
        if self._plan.forced is not None:
            calls = parse_forced(held)
            return ("", calls) if calls else (held, [])
        content, calls = parse_tool_calls(held, self._fmt)
        if not self._plan.parallel:
            calls = calls[:1]
        return content, calls


def wire_calls(calls: list[ToolCall]) -> list[WireToolCall]:
    return [WireToolCall(id=new_id("call_"), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def call_deltas(calls: list[WireToolCall]) -> list[list[ToolCallDelta]]:
    """Per call: its id, type and name with empty arguments, then the arguments (as the SDKs expect)."""
    out = []
    for index, call in enumerate(calls):
        out.append([ToolCallDelta(index, FunctionDelta(name=call.function.name, arguments=""), call.id, "function")])
        out.append([ToolCallDelta(index, FunctionDelta(arguments=call.function.arguments))])
    return out
