"""Tool calling through the real clients (openai SDK, LangChain) on both engines.

The models are a base model (Gemma 270M) and a random one, so "auto" rarely calls anything; the
forced modes ("required", a named function) are held to a grammar and must return a valid call
whose arguments match the schema whatever the model."""

from __future__ import annotations

import json

import openai
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.live import LiveServer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(engine_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{engine_server.url}/v1", api_key="not-needed", max_retries=0)


def _check_weather_call(name: str, arguments: str) -> None:
    assert name == "get_weather"
    args = json.loads(arguments)
    assert args["city"] in ("Paris", "Oslo") and args["unit"] in ("c", "f")


def test_named_tool_choice_returns_a_valid_call(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(
        model="light",
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=150,
    )
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    _check_weather_call(calls[0].function.name, calls[0].function.arguments)  # type: ignore[union-attr]


def test_required_tool_choice_picks_one_of_the_tools(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(
        model="light",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=150,  # type: ignore[arg-type, list-item]
    )
    call = (res.choices[0].message.tool_calls or [])[0]
    assert call.function.name in ("get_weather", "get_time")  # type: ignore[union-attr]
    assert isinstance(json.loads(call.function.arguments), dict)  # type: ignore[union-attr]


def test_streamed_tool_call_reassembles(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="light",
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=150,
        stream=True,
    )
    name, arguments, ids, finish, content = "", "", [], None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            assert call.index == 0
            ids += [call.id] if call.id else []
            name += (call.function.name or "") if call.function else ""
            arguments += (call.function.arguments or "") if call.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "" and len(ids) == 1
    _check_weather_call(name, arguments)


def test_tool_history_is_rendered_into_the_prompt(client: openai.OpenAI) -> None:
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    with_history = client.chat.completions.create(model="light", messages=messages, tools=[WEATHER], max_tokens=4)  # type: ignore[arg-type, list-item]
    without = client.chat.completions.create(model="light", messages=ASK, tools=[WEATHER], max_tokens=4)  # type: ignore[arg-type, list-item]
    assert with_history.usage and without.usage
    assert with_history.usage.prompt_tokens > without.usage.prompt_tokens + 10  # the call and its result are in
    none = client.chat.completions.create(
        model="light", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=4
    )  # type: ignore[arg-type, list-item]
    assert none.usage and none.usage.prompt_tokens < without.usage.prompt_tokens  # "none" offers no tools
    assert none.choices[0].finish_reason != "tool_calls"


def test_bad_tool_requests_are_400s(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(
            model="light",
            messages=ASK,  # type: ignore[arg-type]
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "launch"}},
        )
    with pytest.raises(openai.BadRequestError, match="tool_choice needs tools"):
        client.chat.completions.create(model="light", messages=ASK, tool_choice="required")  # type: ignore[arg-type]


def test_langchain_bind_tools_and_structured_output(engine_server: LiveServer) -> None:
    llm = ChatOpenAI(base_url=f"{engine_server.url}/v1", api_key="x", model="light", max_tokens=150, max_retries=0)  # type: ignore[arg-type]

    class Weather(BaseModel):
        """Current weather in a city"""

        city: str = Field(max_length=12)  # bounded, so even a random model's call completes
        celsius: bool

    bound = llm.bind_tools([Weather], tool_choice="Weather")
    message = bound.invoke([HumanMessage("Weather in Oslo?")])
    assert len(message.tool_calls) == 1 and message.tool_calls[0]["name"] == "Weather"
    assert set(message.tool_calls[0]["args"]) == {"city", "celsius"}
    result = llm.with_structured_output(Weather, method="function_calling").invoke("Weather in Oslo?")
    assert isinstance(result, Weather)


def test_a_huge_tool_schema_is_a_fast_400(client: openai.OpenAI) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "array", "minItems": 10**9}}}
    with pytest.raises(openai.BadRequestError, match="minItems"):
        client.chat.completions.create(model="light", messages=ASK, tools=[tool], tool_choice="required")  # type: ignore[arg-type, list-item]
