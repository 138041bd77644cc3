"""Anthropic's Messages API through the `anthropic` SDK, on both engines (what Claude Code speaks)."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest

from tests.live import LiveServer

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(engine_server: LiveServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=engine_server.url, api_key="not-needed", max_retries=0) as sdk:
        yield sdk


def test_message_shape_and_usage(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model="light", max_tokens=8, system="Answer briefly.", messages=ASK)  # type: ignore[arg-type]
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.usage.input_tokens > 5
    assert all(block.type == "text" for block in msg.content)
    counted = client.messages.count_tokens(model="light", system="Answer briefly.", messages=ASK)  # type: ignore[arg-type]
    assert counted.input_tokens == msg.usage.input_tokens


def test_stop_sequence_is_reported(client: anthropic.Anthropic) -> None:
    stops = [" ", "e", "a", "o", "t", "i", "n", "\n"]
    msg = client.messages.create(model="light", max_tokens=40, messages=ASK, stop_sequences=stops)  # type: ignore[arg-type]
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence in stops
    assert not any(s in "".join(b.text for b in msg.content if b.type == "text") for s in stops)


def test_streamed_text_matches_the_final_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="light", max_tokens=8, messages=ASK) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.usage.output_tokens > 0 and final.stop_reason in ("end_turn", "max_tokens")
    assert text == "".join(b.text for b in final.content if b.type == "text")


@pytest.mark.parametrize("streamed", [False, True])
def test_forced_tool_use(client: anthropic.Anthropic, streamed: bool) -> None:
    kwargs = {
        "model": "light",
        "max_tokens": 150,
        "messages": ASK,
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    if streamed:
        with client.messages.stream(**kwargs) as stream:  # type: ignore[arg-type]
            msg = stream.get_final_message()
    else:
        msg = client.messages.create(**kwargs)  # type: ignore[arg-type]
    assert msg.stop_reason == "tool_use"
    [call] = [b for b in msg.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    assert call.input["city"] in ("Paris", "Oslo") and call.input["unit"] in ("c", "f")  # type: ignore[index]


def test_tool_results_go_into_the_prompt(client: anthropic.Anthropic) -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C, sunny"}]},
    ]
    with_result = client.messages.count_tokens(model="light", messages=history, tools=[WEATHER])  # type: ignore[arg-type, list-item]
    without = client.messages.count_tokens(model="light", messages=ASK, tools=[WEATHER])  # type: ignore[arg-type, list-item]
    assert with_result.input_tokens > without.input_tokens + 10
    assert client.messages.create(model="light", max_tokens=4, messages=history, tools=[WEATHER]).content is not None  # type: ignore[arg-type, list-item]


def test_unsupported_content_is_a_400(client: anthropic.Anthropic) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError, match="image"):
        client.messages.create(model="light", max_tokens=4, messages=[{"role": "user", "content": [image]}])  # type: ignore[list-item]
    with pytest.raises(anthropic.BadRequestError, match="thinking"):
        client.messages.create(
            model="light",
            max_tokens=4,
            messages=ASK,
            thinking={"type": "enabled", "budget_tokens": 1024},  # type: ignore[arg-type]
        )
