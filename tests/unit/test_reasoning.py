"""Thinking split from the answer on outputs recorded from reasoning models, in pieces of every size."""

from __future__ import annotations

import json

import msgspec
import pytest

from backends.reasoning import THINK_OPEN, ReasoningFormat, reasoning_format
from kernel.config import TierSettings
from service.answer import Answer
from service.schemas.chat import ChatCompletionRequest
from service.slots import TierSlot, TierState
from service.tool_calls import plan_tools

QWEN3 = ReasoningFormat("<think>", "</think>", opened_by_prompt=False)
R1 = ReasoningFormat("<think>", "</think>", opened_by_prompt=True)  # DeepSeek-R1's prompt ends with <think>\n

# (format, model output, expected thinking, expected content)
RECORDED = [
    (  # Qwen3-8B
        QWEN3,
        "<think>\nThe user greets me. I should greet back.\n</think>\n\nHello! How can I help you today?",
        "\nThe user greets me. I should greet back.\n",
        "Hello! How can I help you today?",
    ),
    (  # DeepSeek-R1-Distill-Qwen-7B: the template opened the block
        R1,
        "Okay, 2 + 2 is 4.\n</think>\n\nThe answer is **4**.",
        "Okay, 2 + 2 is 4.\n",
        "The answer is **4**.",
    ),
    (QWEN3, "<think>\n\n</think>\n\nNot thinking.", "\n\n", "Not thinking."),
    (QWEN3, "A model that does not think here.", "", "A model that does not think here."),
    (QWEN3, "  <thin k> is not a marker", "", "  <thin k> is not a marker"),
    (R1, "Cut off while still thinking about <", "Cut off while still thinking about <", ""),  # max_tokens
    (QWEN3, "<think>Only the first </think> closes.</think> Yes.", "Only the first ", "closes.</think> Yes."),
]


def _slot(fmt: ReasoningFormat | None) -> TierSlot:
    slot = TierSlot("light", TierSettings(name="light"), TierState.LOADED)
    slot.reasoning, slot.tool_format = fmt, "hermes"
    return slot


def _plan(tools: bool = False):  # type: ignore[no-untyped-def]
    body = {"model": "m", "messages": []}
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    return plan_tools(msgspec.convert(body, ChatCompletionRequest))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize(("fmt", "output", "thinking", "content"), RECORDED)
def test_thinking_never_reaches_content(
    fmt: ReasoningFormat, output: str, thinking: str, content: str, size: int
) -> None:
    answer = Answer(_slot(fmt), _plan())
    pieces = [answer.feed(output[i : i + size]) for i in range(0, len(output), size)]
    tail, calls = answer.finish()
    assert "".join(p.reasoning for p in pieces) + tail.reasoning == thinking
    assert "".join(p.content for p in pieces) + tail.content == content
    assert calls == []
    assert all(THINK_OPEN not in p.content and "</think>" not in p.reasoning for p in [*pieces, tail])


def test_thinking_then_a_tool_call() -> None:  # Qwen3 with tools
    call = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    output = f"<think>\nI need the weather.\n</think>\n\n<tool_call>\n{call}\n</tool_call>"
    parts, calls = Answer(_slot(QWEN3), _plan(tools=True)).split(output)
    assert parts.reasoning == "\nI need the weather.\n" and parts.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]


def test_a_grammar_holds_the_answer_from_its_first_token() -> None:
    parts, _ = Answer(_slot(R1), _plan(), constrained=True).split('{"a": 1}')
    assert parts.content == '{"a": 1}' and parts.reasoning == ""


def test_no_format_keeps_the_text_as_it_is() -> None:
    parts, _ = Answer(_slot(None), _plan()).split("<think>x</think>y")
    assert parts.content == "<think>x</think>y" and parts.reasoning == ""


def test_format_from_setting_then_template() -> None:
    template = "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    assert reasoning_format(template, "auto") == ReasoningFormat("<think>", "</think>", False)
    assert reasoning_format(template, "auto", "<|im_start|>assistant\n<think>\n") == R1
    assert reasoning_format(template, "none") is None
    assert reasoning_format("{{ messages }}", "auto") is None
    assert reasoning_format(None, "think") == QWEN3
