"""Anthropic's Messages API through the `anthropic` SDK, on both engines (what Claude Code speaks);
then the shapes Claude Code sends and the field table of docs/api.md, on a fake engine that
answers with its whole prompt (so a test reads what the model was shown)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from typing import Any

import anthropic
import pydantic
import pytest
from litestar.testing import TestClient

from backends.base import GenerationRequest, ResponseFormat
from embedders.fake import FakeEmbedder
from rerankers.fake import FakeReranker
from service.serving.thinking import EFFORT_BUDGETS
from service.tiers.families import EngineFactories
from tests.api.test_field_policy import ROWS
from tests.live import LiveServer, fake_app, recording_backend

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
    # Anthropic's split: input_tokens are the prompt tokens not read from the cache.
    assert counted.input_tokens == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)
    again = client.messages.create(model="light", max_tokens=8, system="Answer briefly.", messages=ASK)  # type: ignore[arg-type]
    assert again.usage.cache_read_input_tokens and again.usage.input_tokens < counted.input_tokens


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


def test_an_image_is_a_400_naming_the_block(client: anthropic.Anthropic) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    content = [{"type": "text", "text": "What is this?"}, image]
    with pytest.raises(anthropic.BadRequestError, match=re.escape("messages[0].content[1]")) as refused:
        client.messages.create(model="light", max_tokens=4, messages=[{"role": "user", "content": content}])  # type: ignore[typeddict-item]
    assert "image" in str(refused.value)


def test_server_tools_stay_out_of_the_prompt(client: anthropic.Anthropic) -> None:
    """Anthropic's own tools (no schema of ours to offer) add nothing to the prompt."""
    search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}
    bash = {"type": "bash_20250124", "name": "bash"}
    plain = client.messages.count_tokens(model="light", messages=ASK, tools=[WEATHER])  # type: ignore[arg-type, list-item]
    mixed = client.messages.count_tokens(model="light", messages=ASK, tools=[WEATHER, search, bash])  # type: ignore[arg-type, list-item]
    assert mixed.input_tokens == plain.input_tokens


# -- the shapes Claude Code sends, on a fake engine that answers with its prompt ---------------


class Fake:
    def __init__(self, http: TestClient, seen: list[GenerationRequest]) -> None:  # type: ignore[type-arg]
        self.http = http
        self.seen = seen

    def post(self, body: dict[str, Any], path: str = "/v1/messages", **headers: str) -> Any:
        self.seen.clear()
        return self.http.post(path, json={"model": "light", "max_tokens": 4000, **body}, headers=headers)

    def prompt(self, body: dict[str, Any]) -> str:
        """The prompt the model was shown (the fake answers with it)."""
        res = self.post(body)
        assert res.status_code == 200, res.text
        return "".join(b["text"] for b in res.json()["content"] if b["type"] == "text")


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    seen: list[GenerationRequest] = []
    backend = functools.partial(recording_backend(seen), reply=lambda prompt: prompt)
    engines = EngineFactories(backend=backend, embedder=FakeEmbedder, reranker=FakeReranker)
    env = {"LIGHT_MODEL_PATH": "fake/prompt", "LIGHT_N_CTX": "4096", "LIGHT_TOOL_PARSER": "hermes"}
    with fake_app(env, engines) as http:
        yield Fake(http, seen)


def _offered(request: GenerationRequest) -> list[str]:
    return [t["function"]["name"] for t in request.tools or ()]


TOOL = {"name": "Bash", "description": "Run a command", "input_schema": {"type": "object"}}
# As Claude Code 2.1.332 sends a first turn (trimmed): the billing header and cache_control in
# `system`, its environment as a system turn after the user's, custom tools without a type, a
# deferred placeholder, adaptive thinking with an effort, context-management edits, metadata.
CLAUDE_CODE = {
    "system": [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332; cc_entrypoint=sdk-cli;"},
        {"type": "text", "text": "You are a Claude agent.", "cache_control": {"type": "ephemeral"}},
    ],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Reply with the single word: hello"}]},
        {"role": "system", "content": [{"type": "text", "text": "# Environment\nPrimary working directory: /tmp"}]},
    ],
    "tools": [
        TOOL,
        {"name": "Placeholder", "input_schema": {"type": "object"}, "defer_loading": True},
        {"type": "web_search_20250305", "name": "web_search"},
    ],
    "metadata": {"user_id": '{"session_id": "s"}'},
    "thinking": {"type": "adaptive", "display": "omitted"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "high"},
    "stream": True,
}
BETA = "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,effort-2025-11-24"


def _events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """A named-event SSE body as (event, data) pairs."""
    frames = [f for f in body.split("\n\n") if f.strip()]
    pairs = []
    for frame in frames:
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        pairs.append((lines["event"], json.loads(lines["data"])))
    return pairs


def test_claude_codes_first_turn_is_answered_in_events_the_sdk_validates(fake: Fake) -> None:
    res = fake.post(
        CLAUDE_CODE, "/v1/messages?beta=true", **{"anthropic-beta": BETA, "anthropic-version": "2023-06-01"}
    )
    assert res.status_code == 200, res.text
    events = _events(res.text)
    strict = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)
    for name, data in events:
        assert strict.validate_python(data, strict=True).type == name
    assert [n for n, _ in events][:2] == ["message_start", "content_block_start"]
    assert [n for n, _ in events][-2:] == ["message_delta", "message_stop"]
    prompt = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    # The system turn joined the user's turn (most templates take a system message only first).
    assert prompt.startswith("system: x-anthropic-billing-header")
    assert "user: Reply with the single word: hello\n\n# Environment" in prompt and "\nsystem:" not in prompt
    [request] = fake.seen
    assert _offered(request) == ["Bash"]  # no server tool, no deferred tool
    assert (request.thinking, request.thinking_budget) == (True, EFFORT_BUDGETS["high"])


def test_a_second_turn_keeps_the_first_turns_prompt_as_its_start(fake: Fake) -> None:
    """Claude Code's `--continue` sends the first turn again (its system turn now a string): the
    engine can reuse the first prompt's KV only if the second prompt starts with it."""
    first = fake.prompt({**CLAUDE_CODE, "stream": False})
    turn = [
        CLAUDE_CODE["messages"][0],
        {"role": "system", "content": "# Environment\nPrimary working directory: /tmp"},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        {"role": "user", "content": [{"type": "text", "text": "And again", "cache_control": {"type": "ephemeral"}}]},
    ]
    second = fake.prompt({**CLAUDE_CODE, "stream": False, "messages": turn})
    assert second.startswith(first) and second.endswith("assistant: hello\nuser: And again\n")


def test_history_blocks_agents_send_are_kept_out_or_rendered(fake: Fake) -> None:
    lookup = {"name": "Lookup", "input_schema": {"type": "object"}, "defer_loading": True}
    history = [
        {"role": "user", "content": "Find the answer."},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "SECRET-THOUGHT", "signature": "sig"},
                {"type": "redacted_thinking", "data": "REDACTED-DATA"},
                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "Q"}},
                {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
                {"type": "text", "text": "Searching."},
                {"type": "tool_use", "id": "toolu_1", "name": "ToolSearch", "input": {"query": "lookup"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "Found:"}, {"type": "tool_reference", "tool_name": "Lookup"}],
                    "cache_control": {"type": "ephemeral"},
                },
                {"type": "container_upload", "file_id": "file_1"},
                {
                    "type": "search_result",
                    "source": "https://a.example",
                    "title": "A",
                    "content": [{"type": "text", "text": "A-TEXT"}],
                },
                {
                    "type": "document",
                    "source": {"type": "text", "media_type": "text/plain", "data": "DOC-TEXT"},
                    "title": "Notes",
                },
                {"type": "compaction", "content": "SUMMARY-OF-EARLIER"},
                {"type": "a_block_from_the_future", "payload": {"x": 1}},
                {"type": "text", "text": "Go on."},
            ],
        },
    ]
    tools = [{"name": "ToolSearch", "input_schema": {"type": "object"}}, lookup]
    prompt = fake.prompt({"messages": history, "tools": tools})
    for shown in (
        "Searching.",
        "tool: Found:\n\nTool loaded: Lookup",
        "A (https://a.example)\nA-TEXT",
        "Notes\n\nDOC-TEXT",
    ):
        assert shown in prompt
    assert "SUMMARY-OF-EARLIER" in prompt and prompt.rstrip().endswith("Go on.")
    for hidden in ("SECRET-THOUGHT", "REDACTED-DATA", "srvtoolu_1", "file_1", "payload"):
        assert hidden not in prompt
    assert _offered(fake.seen[0]) == ["ToolSearch", "Lookup"]  # the reference loaded the deferred tool


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (
            [{"type": "image", "source": {"type": "url", "url": "https://a.example/x.png"}}],
            "messages[0].content[0]",
        ),
        (
            [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}],
            "messages[0].content[0].content[0]",
        ),
        (
            [{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}],
            "messages[0].content[0]",
        ),
    ],
)
def test_what_a_text_model_cannot_read_is_a_400_naming_the_block(fake: Fake, content: Any, param: str) -> None:
    res = fake.post({"messages": [{"role": "user", "content": content}]})
    assert res.status_code == 400 and res.json()["error"]["param"] == param, res.text


def test_mcp_servers_are_refused_unless_empty(fake: Fake) -> None:
    server = {"type": "url", "url": "https://mcp.example/sse", "name": "x"}
    res = fake.post({"messages": ASK, "mcp_servers": [server]})
    assert res.status_code == 400 and res.json()["error"]["param"] == "mcp_servers"
    assert fake.post({"messages": ASK, "mcp_servers": []}).status_code == 200


@pytest.mark.parametrize(
    ("fields", "switch", "budget"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, True, 2048),
        ({"thinking": {"type": "disabled"}, "output_config": {"effort": "high"}}, False, 0),
        ({"thinking": {"type": "adaptive"}}, None, None),
        ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}}, True, EFFORT_BUDGETS["low"]),
        ({"output_config": {"effort": "max"}}, True, None),  # above high: bounded by max_tokens only
        ({}, None, None),
    ],
)
def test_reasoning_fields_map_onto_the_thinking_switch_and_budget(
    fake: Fake, fields: dict[str, Any], switch: bool | None, budget: int | None
) -> None:
    assert fake.post({"messages": ASK, **fields}).status_code == 200
    [request] = fake.seen
    assert (request.thinking, request.thinking_budget) == (switch, budget)


def test_output_config_format_is_a_grammar(fake: Fake) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert (
        fake.post({"messages": ASK, "output_config": {"format": {"type": "json_schema", "schema": schema}}}).status_code
        == 200
    )
    assert fake.seen[0].response_format == ResponseFormat("json_schema", schema)
    bad = fake.post(
        {"messages": ASK, "output_config": {"format": {"type": "json_schema", "schema": {"$ref": "https://x"}}}}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("output_config.format.schema")


def test_count_tokens_takes_the_same_shapes_and_is_bounded(fake: Fake) -> None:
    body = {k: v for k, v in CLAUDE_CODE.items() if k != "stream"}
    res = fake.post(body, "/v1/messages/count_tokens?beta=true", **{"anthropic-beta": BETA})
    assert res.status_code == 200 and res.json()["input_tokens"] > 50, res.text
    huge = [{"role": "user", "content": "x" * (4096 * 32 + 1)}]  # more characters than 4096 tokens can hold
    res = fake.post({"messages": huge}, "/v1/messages/count_tokens")
    assert res.status_code == 400 and res.json()["error"]["code"] == "context_length_exceeded"


def test_a_whole_message_validates_strictly_against_the_sdk_types(fake: Fake) -> None:
    res = fake.post({"messages": ASK, "tools": [TOOL]})
    assert res.status_code == 200
    message = anthropic.types.Message.model_validate(res.json(), strict=True)
    assert message.usage.cache_creation_input_tokens == 0 and message.stop_reason == "end_turn"


# -- docs/api.md's Messages table (walked by test_field_policy.py) ---------------------------------


def test_the_policy_table_covers_what_claude_code_sends() -> None:
    fields = {row.field.split("[", 1)[0].split(".", 1)[0] for row in ROWS if row.api == "/v1/messages"}
    assert set(CLAUDE_CODE) <= fields
