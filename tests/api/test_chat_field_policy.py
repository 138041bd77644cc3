"""The field tables of chat and legacy completions in docs/api.md, walked on the fake engines: each
row's example is set at its dotted path on a small valid request and the answer must match the
treatment (refused: a 400 naming the field; the others: 200). And every chat answer validates
strictly against the installed openai package's own types (tests/clients-latest.sh runs the same
with the newest release)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from litestar.testing import TestClient
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from service.app import create_app
from service.settings import parse_settings
from service.testing import fake_engines

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
BASE: dict[str, dict[str, Any]] = {
    "Chat completions": {"model": "light", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    "Completions": {"model": "light", "prompt": "Hi", "max_tokens": 4},
}
PATHS = {"Chat completions": "/v1/chat/completions", "Completions": "/v1/completions"}
TREATMENTS = {"honoured", "mapped", "hint", "refused"}


def _rows(section: str) -> list[tuple[str, str, Any]]:
    text = DOC.read_text()
    start = text.index(f"## {section} (")
    end = text.find("\n## ", start + 1)
    rows = []
    for line in text[start : end if end > 0 else None].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        field, treatment, example = cells[0].strip("`"), cells[1], cells[2].strip("`")
        assert treatment in TREATMENTS, f"{section} {field}: unknown treatment {treatment!r}"
        rows.append((field, treatment, json.loads(example)))
    return rows


def _set(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(body))
    parts = path.split(".")
    at: Any = body
    for part in parts[:-1]:
        at = at[int(part)] if isinstance(at, list) else at.setdefault(part, {})
    last = parts[-1]
    if isinstance(at, list):
        at[int(last)] = value
    else:
        at[last] = value
    return body


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:  # type: ignore[type-arg]
    env = {"LIGHT_MODEL_PATH": "fake/echo", "ENABLE_CACHE": "false"}
    app = create_app(parse_settings(env), engines=fake_engines())
    with TestClient(app, base_url="http://localhost") as http:
        deadline = time.monotonic() + 30
        while http.get("/health").json()["tiers"]["light"]["state"] != "loaded":
            assert time.monotonic() < deadline, "the fake engine did not load"
            time.sleep(0.01)
        yield http


def test_the_tables_cover_what_the_sdk_sends() -> None:
    chat = {field for field, _, _ in _rows("Chat completions")}
    completions = {field for field, _, _ in _rows("Completions")}
    assert chat >= set(openai.types.chat.completion_create_params.CompletionCreateParamsBase.__annotations__)
    assert completions >= set(openai.types.completion_create_params.CompletionCreateParamsBase.__annotations__)


@pytest.mark.parametrize("section", list(BASE))
def test_each_field_gets_its_treatment(client: TestClient, section: str) -> None:  # type: ignore[type-arg]
    for field, treatment, example in _rows(section):
        res = client.post(PATHS[section], json=_set(BASE[section], field, example))
        if treatment == "refused":
            assert res.status_code == 400, (field, res.text)
            param = re.sub(r"\[(\d+)\]", r".\1", res.json()["error"]["param"] or "")
            assert param.startswith(field), (field, res.json())
        else:
            assert res.status_code == 200, (field, res.text)


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
