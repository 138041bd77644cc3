"""Thinking split from the answer on outputs recorded from reasoning models, in pieces of every size."""

from __future__ import annotations

import json

import msgspec
import pytest

from backends.base import GenerationRequest, template_variables
from backends.chat_templates import render
from backends.reasoning import THINK_OPEN, ReasoningFormat, ThinkingBudget, reasoning_format
from kernel.config import TierSettings
from kernel.errors import InvalidRequestError
from service.schemas.chat import ChatCompletionRequest
from service.serving.answer import Answer
from service.serving.thinking import ThinkingControl, thinking_control
from service.serving.tool_calls import plan_tools
from service.tiers.slots import TierSlot, TierState

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


# -- reasoning controls: service.serving.thinking and the budget the engines enforce -----------------------


def _budget(fmt: ReasoningFormat, budget: int, *, inside: bool) -> ThinkingBudget:
    return ThinkingBudget(fmt, budget, [900, 901], inside=inside)  # the close marker's token ids


def _run(budget: ThinkingBudget, texts: list[str]) -> list[int | str]:
    """Feed the model's tokens in order; each step emits a forced id or the model's next text."""
    out: list[int | str] = []
    model = iter(texts)
    while True:
        forced = budget.forced()
        if forced is not None:
            out.append(forced)
            budget.observe("</think>" if forced == 900 else "\n\n")
            continue
        text = next(model, None)
        if text is None:
            return out
        out.append(text)
        budget.observe(text)


def test_budget_closes_an_opened_block() -> None:
    out = _run(_budget(R1, 3, inside=True), ["a", "b", "c", "d", "e"])
    assert out == ["a", "b", "c", 900, 901, "d", "e"]


def test_budget_counts_from_the_models_own_opening() -> None:
    # The marker split over tokens is still seen; text before it is no thinking.
    out = _run(_budget(QWEN3, 2, inside=False), ["x", "<th", "ink>", "a", "b", "c"])
    assert out == ["x", "<th", "ink>", "a", "b", 900, 901, "c"]


def test_budget_not_needed_when_the_model_closes() -> None:
    out = _run(_budget(QWEN3, 3, inside=False), ["<think>", "a", "</think>", "b", "c", "d"])
    assert 900 not in out


def test_budget_zero_and_a_second_block() -> None:
    assert _run(_budget(R1, 0, inside=True), ["a"]) == [900, 901, "a"]
    # The budget covers the whole answer: a block reopened after it was spent closes at once.
    out = _run(_budget(QWEN3, 1, inside=False), ["<think>", "a", "b", "<think>", "c"])
    assert out == ["<think>", "a", 900, 901, "b", "<think>", 900, 901, "c"]


def test_thinking_control_levels() -> None:
    assert thinking_control() == ThinkingControl()
    none = thinking_control(effort="none")
    assert (none.enabled, none.budget) == (False, 0)
    low = thinking_control(effort="low")
    assert (low.enabled, low.budget) == (True, 1024) and ("reasoning_effort", "low") in low.template_kwargs
    high = thinking_control(effort="xhigh")  # above high: bounded by max_tokens only
    assert (high.enabled, high.budget) == (True, None) and ("reasoning_effort", "high") in high.template_kwargs
    # A level newer than our table is a hint: the template's default, no budget, nothing passed on.
    assert thinking_control(effort="ultra") == ThinkingControl()


def test_thinking_control_template_kwargs() -> None:
    off = thinking_control(effort="high", template_kwargs={"enable_thinking": False})
    assert (off.enabled, off.budget) == (False, 0)
    assert thinking_control(template_kwargs={"thinking": True}).enabled is True
    assert thinking_control(budget=50, enabled=True).budget == 50
    for bad, param in (
        ({"messages": []}, "chat_template_kwargs.messages"),
        ({"not a name": 1}, "chat_template_kwargs.not a name"),
        ({f"k{i}": 1 for i in range(40)}, "chat_template_kwargs"),
        ({"big": "x" * 9000}, "chat_template_kwargs"),
    ):
        with pytest.raises(InvalidRequestError) as err:
            thinking_control(template_kwargs=bad)
        assert err.value.param == param


def test_template_variables_carry_the_switch() -> None:
    request = GenerationRequest(thinking=False, template_kwargs=(("custom", 1), ("tools", [])))
    assert template_variables(request) == {"custom": 1, "enable_thinking": False, "thinking": False}
    assert template_variables(GenerationRequest(template_kwargs=(("enable_thinking", True),))) == {
        "enable_thinking": True
    }


def test_jinja_render_sees_the_switch() -> None:
    template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
        "{{ reasoning_effort | default('medium') }}"
    )
    assert render(template, [{"role": "user", "content": "Hi"}]) == "Himedium"
    off = render(template, [{"role": "user", "content": "Hi"}], None, {"enable_thinking": False, "messages": []})
    assert off == "Hi<think>\n\n</think>\n\nmedium", "the render's own names win over variables"
    effort = thinking_control(effort="minimal")
    assert render(template, [{"role": "user", "content": "Hi"}], None, dict(effort.template_kwargs)) == "Hilow"


def test_the_switch_decides_whether_the_prompt_opened_the_block() -> None:
    # A template that opens the block by default and writes a closed, empty one when thinking is off.
    fmt = ReasoningFormat("<think>", "</think>", True, opened_if_on=True, opened_if_off=False)
    assert fmt.switched(None) == fmt and fmt.switched(True).opened_by_prompt
    assert not fmt.switched(False).opened_by_prompt
    assert R1.switched(False) == R1, "unknown: the probe's default stands"
    slot = _slot(fmt)
    parts, _ = Answer(slot, _plan(), thinking=False).split("Paris.")
    assert (parts.reasoning, parts.content) == ("", "Paris.")
    parts, _ = Answer(slot, _plan()).split("Hmm.</think>\n\nParis.")
    assert (parts.reasoning, parts.content) == ("Hmm.", "Paris.")
