"""OpenAI's Responses API through the openai SDK's `responses.create` on both engines: plain and
streamed, input items with tool history, forced function calls, structured text. Then, on the
fake engine in-process: what Codex CLI sends (namespace, custom and hosted tools, its history
items, reasoning and cache hints), what is refused by name, stored responses (GET, DELETE,
input_items, previous_response_id, bounds, restarts); every answer and stream event validated
strictly against the installed openai package's types."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest
from litestar.testing import TestClient
from openai.pagination import SyncCursorPage
from openai.types.responses import Response as ResponseType
from openai.types.responses import ResponseItem, ResponseStreamEvent

from service.testing import fake_engines
from tests.live import LiveServer, error_of, fake_app

StreamEvent: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
InputItemListType = SyncCursorPage[ResponseItem]

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
    assert res.object == "response" and res.id.startswith("resp_") and res.store is True
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
        ({"include": ["file_search_call.results"]}, "include"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
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


# -- On the fake engine (in-process): the shapes agents send, and stored responses ------------------

SHELL_CALL = '<tool_call>{"name": "exec_command", "arguments": {"cmd": "ls"}}</tool_call>'
NS_CALL = '<tool_call>{"name": "multi_agent_v1.spawn_agent", "arguments": {"message": "hi"}}</tool_call>'
PATCH_CALL = '<tool_call>{"name": "apply_patch", "arguments": {"input": "*** Begin Patch"}}</tool_call>'
LOCAL_CALL = '<tool_call>{"name": "local_shell", "arguments": {"command": ["ls", "-l"]}}</tool_call>'
SCRIPT = {
    "run ls": SHELL_CALL,
    "spawn one": NS_CALL,
    "patch it": PATCH_CALL,
    "list here": LOCAL_CALL,
    "think first": "<think>pondering</think>hi",
}
# What Codex CLI 0.171.0 sends (tools and fields as captured, descriptions cut short).
CODEX_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "exec_command",
        "description": "Runs a command in a PTY, returning output or a session ID for ongoing interaction.",
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": {"cmd": {"type": "string"}, "workdir": {"type": "string"}},
            "required": ["cmd"],
            "additionalProperties": False,
        },
    },
    {
        "type": "namespace",
        "name": "multi_agent_v1",
        "description": "Tools for spawning and managing sub-agents.",
        "tools": [
            {
                "type": "function",
                "name": "spawn_agent",
                "description": "Spawn a sub-agent.",
                "strict": False,
                "parameters": {"type": "object", "properties": {"message": {"type": "string"}}, "required": []},
            }
        ],
    },
    {"type": "custom", "name": "apply_patch", "description": "Edit files.", "format": {"type": "text"}},
    {"type": "web_search", "external_web_access": False},
]
CODEX_FIELDS: dict[str, Any] = {
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "reasoning": {"summary": "auto"},
    "store": False,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "01a23c96-b786-73c0-b3f4-ff17f1e6630e",
    "client_metadata": {"session_id": "01a23c96", "x-codex-turn-metadata": "{}"},
}


def _scripted(prompt: str) -> str:
    last = prompt.rstrip().rsplit("\n", 1)[-1]
    return next((reply for cue, reply in SCRIPT.items() if cue in last), last.split(": ", 1)[-1])


@contextmanager
def _fake_app(folder: Path, **env: str) -> Iterator[TestClient]:  # type: ignore[type-arg]
    base = {"LIGHT_MODEL_PATH": "fake/script", "LIGHT_REASONING_PARSER": "think", "BATCH_DIR": str(folder)}
    with fake_app({**base, **env}, fake_engines(reply=_scripted)) as http:
        yield http


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[TestClient]:  # type: ignore[type-arg]
    with _fake_app(tmp_path) as http:
        yield http


def _create(http: TestClient, **body: Any) -> dict[str, Any]:  # type: ignore[type-arg]
    res = http.post("/v1/responses", json={"model": "light", **body})
    assert res.status_code == 200, res.text
    answer: dict[str, Any] = res.json()
    ResponseType.model_validate(answer, strict=True)  # every required field, as typed clients need
    return answer


def _events(http: TestClient, **body: Any) -> list[dict[str, Any]]:  # type: ignore[type-arg]
    res = http.post("/v1/responses", json={"model": "light", "stream": True, **body})
    assert res.status_code == 200, res.text
    events = [json.loads(line[6:]) for line in res.text.splitlines() if line.startswith("data: ")]
    for event in events:
        StreamEvent.validate_python(event)
    return events


def test_codex_request_is_answered(fake: TestClient) -> None:  # type: ignore[type-arg]
    answer = _create(fake, input="Reply with the single word: hello", tools=CODEX_TOOLS, **CODEX_FIELDS)
    assert answer["output"][-1]["content"][0]["text"] == "Reply with the single word: hello"
    assert answer["store"] is False and answer["reasoning"] == {"summary": "auto"}
    assert answer["usage"]["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
    assert [t["type"] for t in answer["tools"]] == ["function", "namespace", "custom", "web_search"]
    events = _events(fake, input="Reply with the single word: hello", tools=CODEX_TOOLS, **CODEX_FIELDS)
    assert events[-1]["type"] == "response.completed"


@pytest.mark.parametrize("stream", [False, True])
def test_calls_come_back_as_the_items_codex_expects(fake: TestClient, stream: bool) -> None:  # type: ignore[type-arg]
    expected = {
        "run ls": {"type": "function_call", "name": "exec_command", "arguments": '{"cmd": "ls"}', "namespace": None},
        "spawn one": {"type": "function_call", "name": "spawn_agent", "namespace": "multi_agent_v1"},
        "patch it": {"type": "custom_tool_call", "name": "apply_patch", "input": "*** Begin Patch"},
    }
    for cue, item in expected.items():
        body = {"input": cue, "tools": CODEX_TOOLS, **CODEX_FIELDS}
        if stream:
            events = _events(fake, **body)
            output = events[-1]["response"]["output"]
            kinds = {e["type"] for e in events}
            assert ("response.custom_tool_call_input.done" in kinds) == (item["type"] == "custom_tool_call")
        else:
            output = _create(fake, **body)["output"]
        assert len(output) == 1 and output[0]["call_id"].startswith("call_")
        assert item.items() <= output[0].items()


def test_streamed_events_are_numbered_in_the_order_they_are_sent(fake: TestClient) -> None:  # type: ignore[type-arg]
    tools = [*CODEX_TOOLS, {"type": "local_shell"}]
    for cue in ("run ls", "patch it", "list here", "think first"):
        events = _events(fake, input=cue, tools=tools, **CODEX_FIELDS)
        assert [e["sequence_number"] for e in events] == list(range(len(events))), cue


def test_local_shell_call(fake: TestClient) -> None:  # type: ignore[type-arg]
    tools = [{"type": "local_shell"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}]
    output = _create(fake, input="list here", tools=tools)["output"]
    assert [o["type"] for o in output] == ["local_shell_call"]
    assert output[0]["action"]["command"] == ["ls", "-l"] and output[0]["action"]["type"] == "exec"
    events = _events(fake, input="list here", tools=tools)
    assert events[-1]["response"]["output"][0]["action"]["command"] == ["ls", "-l"]


def test_tool_history_codex_sends_back(fake: TestClient) -> None:  # type: ignore[type-arg]
    history = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "go"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": None, "encrypted_content": None},
        {
            "type": "function_call",
            "call_id": "c1",
            "name": "spawn_agent",
            "namespace": "multi_agent_v1",
            "arguments": "{}",
        },
        {"type": "function_call_output", "call_id": "c1", "output": "spawned"},
        {"type": "custom_tool_call", "call_id": "c2", "name": "apply_patch", "input": "*** Begin Patch"},
        {"type": "custom_tool_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "patched"}]},
        {
            "type": "local_shell_call",
            "call_id": "c3",
            "status": "completed",
            "action": {"type": "exec", "command": ["ls"], "env": {}},
        },
        {"type": "local_shell_call_output", "call_id": "c3", "output": "out.txt"},
        {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search", "query": "x"}},
    ]
    answer = _create(fake, input=history, tools=CODEX_TOOLS, **CODEX_FIELDS)
    assert answer["output"][-1]["content"][0]["text"] == "out.txt"  # the fake echoes the last tool output


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}]},
            "input[0].output[0]",
        ),
        ({"input": [{"type": "compaction", "encrypted_content": "x"}]}, "input[0].type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"previous_response_id": "resp_0123456789abcdef01234567"}, "previous_response_id"),
    ],
)
def test_what_would_mislead_is_refused_by_name(fake: TestClient, change: dict[str, Any], param: str) -> None:  # type: ignore[type-arg]
    res = fake.post("/v1/responses", json={"model": "light", "input": "Hi", **change})
    assert res.status_code in (400, 404), res.text
    assert res.json()["error"]["param"] == param


def test_reasoning_effort_and_hints_are_accepted(fake: TestClient) -> None:  # type: ignore[type-arg]
    answer = _create(
        fake,
        input="Hi",
        reasoning={"effort": "high", "summary": "detailed"},
        text={"verbosity": "low"},
        service_tier="auto",
        safety_identifier="u1",
        metadata={"k": "v"},
        truncation="auto",
        max_tool_calls=1,
    )
    assert answer["output"][0]["content"][0]["text"] == "Hi" and answer["reasoning"]["effort"] == "high"


def test_reasoning_summary_carries_the_thinking(fake: TestClient) -> None:  # type: ignore[type-arg]
    plain = _create(fake, input="think first")["output"][0]
    assert plain["content"] == [{"type": "reasoning_text", "text": "pondering"}] and plain["summary"] == []
    summarised = _create(fake, input="think first", reasoning={"summary": "auto"})["output"][0]
    assert summarised["summary"] == [{"type": "summary_text", "text": "pondering"}]  # what Codex shows
    events = _events(fake, input="think first", reasoning={"summary": "auto"})
    deltas = [e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta"]
    assert deltas == ["pondering"] and events[-1]["response"]["output"][0]["summary"][0]["text"] == "pondering"


def test_stored_response_get_continue_list_delete(fake: TestClient) -> None:  # type: ignore[type-arg]
    first = _create(fake, input=[{"role": "user", "content": "first turn"}])  # store defaults to true
    assert first["store"] is True
    assert fake.get(f"/v1/responses/{first['id']}").json() == first
    second = _create(fake, input="second turn", previous_response_id=first["id"], instructions="Be brief.")
    assert second["previous_response_id"] == first["id"] and second["output"][0]["content"][0]["text"] == "second turn"
    # The prompt held the first turn's input and output: its tokens count.
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"] + len("second turn")
    items = fake.get(f"/v1/responses/{second['id']}/input_items").json()
    assert items["object"] == "list" and items["has_more"] is False
    assert [i["content"][0]["text"] for i in items["data"]] == ["second turn"]
    InputItemListType.model_validate(items)
    assert fake.delete(f"/v1/responses/{first['id']}").json() == {
        "id": first["id"],
        "object": "response",
        "deleted": True,
    }
    for res in (
        fake.get(f"/v1/responses/{first['id']}"),
        fake.delete(f"/v1/responses/{first['id']}"),
        fake.post("/v1/responses", json={"model": "light", "input": "x", "previous_response_id": second["id"]}),
    ):
        assert res.status_code == 404 and res.json()["error"]["code"] == "response_not_found"


def test_input_items_pages(fake: TestClient) -> None:  # type: ignore[type-arg]
    answer = _create(fake, input=[{"role": "user", "content": f"turn {i}"} for i in range(5)])
    url = f"/v1/responses/{answer['id']}/input_items"
    page = fake.get(url, params={"limit": 2, "order": "asc"}).json()
    assert [i["content"][0]["text"] for i in page["data"]] == ["turn 0", "turn 1"] and page["has_more"]
    rest = fake.get(url, params={"limit": 10, "order": "asc", "after": page["last_id"]}).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["turn 2", "turn 3", "turn 4"] and not rest["has_more"]
    newest = fake.get(url).json()["data"]
    assert newest[0]["content"][0]["text"] == "turn 4"


def test_store_false_keeps_nothing_and_streamed_responses_are_kept(fake: TestClient, tmp_path: Path) -> None:  # type: ignore[type-arg]
    answer = _create(fake, input="Hi", store=False)
    assert answer["store"] is False and fake.get(f"/v1/responses/{answer['id']}").status_code == 404
    done = _events(fake, input="streamed", store=True)[-1]["response"]
    assert done["store"] is True and fake.get(f"/v1/responses/{done['id']}").json() == done


def test_stored_responses_survive_a_restart_and_the_oldest_are_evicted(tmp_path: Path) -> None:
    with _fake_app(tmp_path, RESPONSES_MAX_STORED="2") as http:
        ids = [_create(http, input=f"turn {i}")["id"] for i in range(3)]
        assert http.get(f"/v1/responses/{ids[0]}").status_code == 404  # evicted: over the count
    assert sorted(p.stem for p in (tmp_path / "responses").glob("resp_*.json")) == sorted(ids[1:])
    with _fake_app(tmp_path, RESPONSES_MAX_STORED="2", RESPONSES_STORE_DEFAULT="false") as http:
        assert http.get(f"/v1/responses/{ids[2]}").json()["output"][0]["content"][0]["text"] == "turn 2"
        assert _create(http, input="not kept")["store"] is False
        size = len((tmp_path / "responses" / f"{ids[2]}.json").read_bytes())
    with _fake_app(tmp_path, RESPONSES_MAX_BYTES=str(size + 10)) as http:  # one fits
        assert http.get(f"/v1/responses/{ids[1]}").status_code == 404
        assert http.get(f"/v1/responses/{ids[2]}").status_code == 200
