"""Chat and legacy completions against the openai package's own request and answer types: the field
tables of docs/api.md (walked by test_field_policy.py) cover every field the SDK defines, and every
answer validates strictly (tests/clients-latest.sh runs the same with the newest release)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from litestar.testing import TestClient
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.api.test_field_policy import ROWS
from tests.live import fake_app

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
BASE: dict[str, dict[str, Any]] = {
    "Chat completions": {"model": "light", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    "Completions": {"model": "light", "prompt": "Hi", "max_tokens": 4},
}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:  # type: ignore[type-arg]
    env = {"LIGHT_MODEL_PATH": "fake/echo", "ENABLE_CACHE": "false"}
    with fake_app(env) as http:
        yield http


def test_the_tables_cover_what_the_sdk_sends() -> None:
    chat = {row.field for row in ROWS if row.api == "/v1/chat/completions"}
    completions = {row.field for row in ROWS if row.api == "/v1/completions"}
    assert chat >= set(openai.types.chat.completion_create_params.CompletionCreateParamsBase.__annotations__)
    assert completions >= set(openai.types.completion_create_params.CompletionCreateParamsBase.__annotations__)


def test_image_parts_are_refused_by_position(client: TestClient) -> None:  # type: ignore[type-arg]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "input_audio"}]},
    ]
    res = client.post("/v1/chat/completions", json={**BASE["Chat completions"], "messages": messages})
    assert res.status_code == 400 and res.json()["error"]["param"] == "messages[1].content[1]"
    assert "input_audio" in res.json()["error"]["message"]
    text_only = [{"role": "user", "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]}]
    res = client.post(
        "/v1/chat/completions", json={**BASE["Chat completions"], "messages": text_only, "max_tokens": 64}
    )
    assert res.status_code == 200 and res.json()["choices"][0]["message"]["content"] == "one two"


def test_reasoning_fields_are_checked(client: TestClient) -> None:  # type: ignore[type-arg]
    body = BASE["Chat completions"]
    for extra in ({"reasoning_effort": "none"}, {"reasoning_effort": "some-future-level"}):
        assert client.post("/v1/chat/completions", json={**body, **extra}).status_code == 200
    res = client.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"add_generation_prompt": False}})
    assert res.status_code == 400 and res.json()["error"]["param"] == "chat_template_kwargs.add_generation_prompt"
    res = client.post("/v1/chat/completions", json={**body, "modalities": ["text", "audio"]})
    assert res.status_code == 400 and res.json()["error"]["param"] == "modalities"


def test_answers_validate_strictly(client: TestClient) -> None:  # type: ignore[type-arg]
    body = {**BASE["Chat completions"], "logprobs": True, "top_logprobs": 2}
    res = client.post("/v1/chat/completions", json=body)
    ChatCompletion.model_validate(res.json(), strict=True)
    streamed = {**body, "stream": True, "n": 2, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=streamed) as stream:
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 3
    for event in events[:-1]:
        ChatCompletionChunk.model_validate(json.loads(event), strict=True)


def test_tool_calls_and_completions_validate_strictly(client: TestClient) -> None:  # type: ignore[type-arg]
    # The fake engine echoes the last line: here, a tool call in the template's (hermes) format.
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = {**BASE["Chat completions"], "messages": [{"role": "user", "content": call}], "tools": tools}
    body["max_tokens"] = 200
    answer = ChatCompletion.model_validate(client.post("/v1/chat/completions", json=body).json(), strict=True)
    assert answer.choices[0].finish_reason == "tool_calls" and answer.choices[0].message.tool_calls
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    chunks = [ChatCompletionChunk.model_validate(json.loads(e), strict=True) for e in events[:-1]]
    assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    completion = client.post("/v1/completions", json={**BASE["Completions"], "logprobs": 2, "echo": True}).json()
    openai.types.Completion.model_validate(completion, strict=True)


def test_legacy_functions_answer_in_their_own_shape(client: TestClient) -> None:  # type: ignore[type-arg]
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
        {"role": "function", "name": "get_weather", "content": "sunny"},
        {"role": "user", "content": call},
    ]
    functions = [{"name": "get_weather", "parameters": {"type": "object"}}]
    body = {**BASE["Chat completions"], "messages": history, "functions": functions, "max_tokens": 200}
    answer = ChatCompletion.model_validate(client.post("/v1/chat/completions", json=body).json(), strict=True)
    choice = answer.choices[0]
    assert choice.finish_reason == "function_call" and not choice.message.tool_calls
    assert choice.message.function_call is not None and choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Oslo"}
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    chunks = [ChatCompletionChunk.model_validate(json.loads(e), strict=True) for e in events[:-1]]
    deltas = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
    assert deltas[0].name == "get_weather" and json.loads("".join(d.arguments or "" for d in deltas)) == {
        "city": "Oslo"
    }
    assert chunks[-1].choices[0].finish_reason == "function_call"
    both = {**body, "tools": [{"type": "function", "function": functions[0]}]}
    res = client.post("/v1/chat/completions", json=both)
    assert res.status_code == 400 and res.json()["error"]["param"] == "functions"
