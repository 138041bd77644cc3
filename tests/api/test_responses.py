"""OpenAI's Responses API through the openai SDK's `responses.create` on both engines: plain and
streamed, input items with tool history, forced function calls, structured text, and the fields a
stateless server refuses by name."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.live import LiveServer, error_of

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "18 C and sunny"},
]


@pytest.fixture(scope="module")
def client(engine_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{engine_server.url}/v1", api_key="x", max_retries=0)


def test_plain_response_is_chat_on_the_same_path(client: openai.OpenAI) -> None:
    res = client.responses.create(model="light", instructions="Be brief.", input="Say hello.", max_output_tokens=8)
    chat = client.chat.completions.create(
        model="light",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}],
        max_tokens=8,
    )
    assert res.object == "response" and res.id.startswith("resp_") and res.store is False
    assert res.output_text  # (llama.cpp's logits shift with prefix reuse, so not compared to chat's text)
    assert res.usage is not None and chat.usage is not None
    assert res.usage.input_tokens == chat.usage.prompt_tokens  # the same prompt as chat's
    assert res.usage.total_tokens == res.usage.input_tokens + res.usage.output_tokens
    if res.status == "incomplete":
        assert res.incomplete_details is not None and res.incomplete_details.reason == "max_output_tokens"
        assert res.usage.output_tokens == 8 and res.output[0].status == "incomplete"
    else:
        assert res.status == "completed" and res.usage.output_tokens < 8


def test_streamed_events_build_the_same_response(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="light", input="Count: one, two,", max_output_tokens=8, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert deltas and deltas == final.output_text
    assert final.id == events[0].response.id  # type: ignore[union-attr]


def test_tool_history_items_reach_the_prompt(client: openai.OpenAI) -> None:
    res = client.responses.create(model="light", input=HISTORY, tools=[WEATHER], max_output_tokens=4)  # type: ignore[arg-type,list-item]
    chat = client.chat.completions.create(
        model="light",
        messages=[
            HISTORY[0],
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
        ],
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],  # type: ignore[list-item]
        max_tokens=4,
    )
    assert res.usage is not None and chat.usage is not None
    assert res.usage.input_tokens == chat.usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_returns_a_function_call(client: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = {
        "model": "light",
        "input": "Weather in Oslo?",
        "tools": [WEATHER],
        "max_output_tokens": 60,
    }
    if not stream:
        res = client.responses.create(**kwargs, tool_choice="required")
    else:
        events = list(
            client.responses.create(**kwargs, tool_choice={"type": "function", "name": "get_weather"}, stream=True)
        )
        args = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert len(args) == 1 and args[0].name == "get_weather"  # type: ignore[union-attr]
        assert events[-1].type == "response.completed"
        res = events[-1].response  # type: ignore[union-attr]
    calls = [o for o in res.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")  # type: ignore[union-attr]
    assert json.loads(calls[0].arguments)["city"] in ("Paris", "Oslo")  # type: ignore[union-attr]
    assert res.status == "completed"


def test_structured_text_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    res = client.responses.create(
        model="light",
        input="Answer in JSON.",
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
        max_output_tokens=40,
    )
    assert isinstance(json.loads(res.output_text)["ok"], bool)


def test_logprobs_included(client: openai.OpenAI) -> None:
    res = client.responses.create(
        model="light", input="Hi", max_output_tokens=3, include=["message.output_text.logprobs"], top_logprobs=2
    )
    part = res.output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs and len(part.logprobs) == res.usage.output_tokens  # type: ignore[union-attr]
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in part.logprobs)
    alone = client.responses.create(model="light", input="Hi", max_output_tokens=2, top_logprobs=1)
    assert all(len(lp.top_logprobs) == 1 for lp in alone.output[0].content[0].logprobs)  # type: ignore[union-attr]
    assert alone.output[0].content[0].logprobs  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"input": []}, "input"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ],
)
def test_unsupported_fields_are_named(engine_server: LiveServer, change: dict[str, Any], param: str) -> None:
    with httpx.Client(base_url=engine_server.url, timeout=60) as http:
        body = {"model": "light", "input": "Hi", **change}
        error = error_of(http.post("/v1/responses", json=body), 400)
    assert error["param"] == param
