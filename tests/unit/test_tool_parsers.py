"""Tool-call parsers on outputs recorded from real models of each format, and the streaming filter."""

from __future__ import annotations

import json

import msgspec
import pytest

from backends.tools import fold_tools, forced_call_schema, parse_forced, parse_tool_calls, tool_format
from service.schemas.chat import ChatCompletionRequest
from service.serving.tool_calls import ToolCallFilter, plan_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}

# (format, model output, expected text, expected calls as (name, arguments))
RECORDED = [
    (  # Qwen2.5-7B-Instruct (Hermes)
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
        "\n</tool_call>",
        "Let me check.",
        [("get_weather", {"city": "Paris", "unit": "c"})],
    ),
    (  # Hermes-3, two calls in one answer
        "hermes",
        '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"x": 1}}\n'
        "</tool_call>",
        "",
        [("a", {}), ("b", {"x": 1})],
    ),
    ("hermes", '<tool_call>\n{"name": "get_weather", "argu', '<tool_call>\n{"name": "get_weather", "argu', []),
    (  # Llama-3.1-8B-Instruct: bare JSON with "parameters"
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    ("llama3", '<|python_tag|>{"name": "f", "parameters": {"q": "x"}}', "", [("f", {"q": "x"})]),
    ("llama3", "The weather is fine {really}.", "The weather is fine {really}.", []),
    (  # Mistral-7B-Instruct-v0.3
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    ("mistral", "No tools needed.", "No tools needed.", []),
]


@pytest.mark.parametrize(("fmt", "output", "text", "calls"), RECORDED)
def test_parsers_on_recorded_outputs(fmt: str, output: str, text: str, calls: list[tuple[str, object]]) -> None:
    got_text, got_calls = parse_tool_calls(output, fmt)  # type: ignore[arg-type]
    assert got_text == text
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls


@pytest.mark.parametrize(("fmt", "output", "text", "calls"), RECORDED)
def test_streaming_filter_in_small_pieces(fmt: str, output: str, text: str, calls: list[tuple[str, object]]) -> None:
    request = msgspec.convert({"model": "m", "messages": [], "tools": [WEATHER]}, ChatCompletionRequest)
    stream = ToolCallFilter(fmt, plan_tools(request))  # type: ignore[arg-type]
    sent = "".join(stream.feed(output[i : i + 3]) for i in range(0, len(output), 3))
    tail, got = stream.finish()
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert (sent + tail).strip() == text.strip()
    if calls:  # nothing of a call ever goes out as content
        assert "{" not in sent and "<tool_call>" not in sent


def test_format_follows_setting_then_template() -> None:
    assert tool_format("{% if tools %}[TOOL_CALLS]{% endif %}") == "mistral"
    assert tool_format("{% for t in tools %}<|python_tag|>{% endfor %}") == "llama3"
    assert tool_format("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert tool_format("[TOOL_CALLS] but no tool variable") == "hermes"  # folded into our Hermes prompt
    assert tool_format(None, "mistral") == "mistral"


def test_forced_schema_and_parse() -> None:
    schema = forced_call_schema([WEATHER], "get_weather")
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert "anyOf" in forced_call_schema([WEATHER, {"function": {"name": "b"}}], None)
    assert [c.name for c in parse_forced('{"name": "get_weather", "arguments": {"city": "Oslo"}}')] == ["get_weather"]
    assert parse_forced('{"name": "get_weather", "arguments": ') == []


def test_fold_tools_writes_calls_and_results_as_text() -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "content": "42"},
        {"role": "tool", "content": "43"},
    ]
    out = fold_tools(messages, [WEATHER])
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'}
    assert out[3]["role"] == "user" and out[3]["content"].count("<tool_response>") == 2
    assert fold_tools([{"role": "user", "content": "x"}], []) == [{"role": "user", "content": "x"}]
