"""Every answer validates against the installed SDKs' own types (openai, anthropic), every required
field present: typed clients (Go, Rust, C#) reject what Python's lenient parsing lets through.
tests/clients-latest.sh runs this with the newest releases, which is where a new required field
shows up first. In-process on a fake engine that answers a tool call when asked to."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from anthropic.types import Message, RawMessageStreamEvent
from litestar.testing import TestClient
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from service.testing import fake_engines
from tests.live import fake_app

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def reply(prompt: str) -> str:
    return CALL if "weather" in prompt else "plain answer"


@pytest.fixture(scope="module")
def http() -> Iterator[TestClient]:  # type: ignore[type-arg]
    env = {"LIGHT_MODEL_PATH": "fake/echo", "EMBEDDING_MODEL_PATH": "fake/words"}
    with fake_app(env, fake_engines(reply=reply)) as client:
        yield client


PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}}]
RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "parameters": PARAMS}]
MESSAGES_TOOLS = [{"name": "get_weather", "input_schema": PARAMS}]


def chat(text: str) -> dict[str, Any]:
    return {"model": "light", "max_tokens": 64, "messages": [{"role": "user", "content": text}], "tools": CHAT_TOOLS}


def responses(text: str) -> dict[str, Any]:
    return {"model": "light", "max_output_tokens": 64, "input": text, "tools": RESPONSES_TOOLS}


def messages(text: str) -> dict[str, Any]:
    return {
        "model": "light",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
        "tools": MESSAGES_TOOLS,
    }


# The legacy completions stream has no event type of its own: the SDK reuses `Completion`, whose
# finish_reason cannot be null as it is on every chunk but the last (OpenAI's own stream too).
CASES = [  # path, body, answer type, stream event type
    pytest.param("/v1/chat/completions", chat("hello"), ChatCompletion, ChatCompletionChunk, id="chat"),
    pytest.param("/v1/chat/completions", chat("the weather?"), ChatCompletion, ChatCompletionChunk, id="chat-tool"),
    pytest.param(
        "/v1/completions", {"model": "light", "prompt": "hi", "max_tokens": 8}, Completion, None, id="completions"
    ),
    pytest.param("/v1/responses", responses("hello"), Response, ResponseStreamEvent, id="responses"),
    pytest.param("/v1/responses", responses("the weather?"), Response, ResponseStreamEvent, id="responses-tool"),
    pytest.param("/v1/messages", messages("hello"), Message, RawMessageStreamEvent, id="messages"),
    pytest.param("/v1/messages", messages("the weather?"), Message, RawMessageStreamEvent, id="messages-tool"),
]


def validate(kind: Any, data: Any) -> None:
    TypeAdapter(kind).validate_python(data)  # raises naming each missing or mistyped field


@pytest.mark.parametrize(("path", "body", "answer", "event"), CASES)
def test_answers_and_stream_events_validate(
    http: TestClient,  # type: ignore[type-arg]
    path: str,
    body: dict[str, Any],
    answer: Any,
    event: Any,
) -> None:
    res = http.post(path, json=body)
    assert res.status_code == 200, res.text
    validate(answer, res.json())
    streamed = http.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200, streamed.text
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ") and line[6:] != "[DONE]"]
    assert events
    for data in events:
        parsed = json.loads(data)
        if event is not None:
            validate(event, parsed)


def test_model_list_and_embeddings_validate(http: TestClient) -> None:  # type: ignore[type-arg]
    for card in http.get("/v1/models").json()["data"]:
        validate(Model, card)
    validate(CreateEmbeddingResponse, http.post("/v1/embeddings", json={"model": "embedding", "input": "hi"}).json())
