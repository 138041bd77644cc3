"""The OpenAI Agents SDK (`openai-agents`) as a client: a triage agent with one function tool and a
handoff to a second agent, against a live server whose engine plays a script (Hermes-format tool
calls, then text), through both of the SDK's models: Responses and Chat Completions. The run must
complete, the tool's Python function must really have run, and the second agent must answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from agents import (
    Agent,
    HandoffOutputItem,
    Model,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    ToolCallOutputItem,
    function_tool,
    set_tracing_disabled,
)

from service.testing import fake_engines
from tests.live import LiveServer, live_server

TRIAGE = "You are the triage agent: look the weather up, then hand over to the reporter."
REPORTER = "You are the weather reporter: tell the user what the tool found."
FINAL = "Reporter here: Paris is sunny-21."


def script(prompt: str) -> str:
    """The scripted model: what it answers depends only on who asks and what the prompt holds.
    The fake engine renders each turn as `role: content`, so the tool's result shows up as text."""
    if REPORTER in prompt:
        return FINAL
    if "sunny-21" not in prompt:
        call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    else:
        call = {"name": "transfer_to_reporter", "arguments": {}}
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    set_tracing_disabled(True)  # the SDK would otherwise export traces to OpenAI
    env = {"LIGHT_MODEL_PATH": "fake/agents-script", "LIGHT_MAX_TOKENS": "256"}
    with live_server(env, wait_for=("light",), engines=fake_engines(reply=script)) as live:
        yield live


def model_of(kind: str, server: LiveServer) -> Model:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    if kind == "responses":
        return OpenAIResponsesModel(model="light", openai_client=client)
    return OpenAIChatCompletionsModel(model="light", openai_client=client)


@pytest.mark.parametrize("kind", ["responses", "chat"])
def test_tool_and_handoff_complete(server: LiveServer, kind: str) -> None:
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"{city} is sunny-21"

    model = model_of(kind, server)
    reporter = Agent(name="reporter", instructions=REPORTER, model=model)
    triage = Agent(name="triage", instructions=TRIAGE, model=model, tools=[get_weather], handoffs=[reporter])

    result = Runner.run_sync(triage, "What is the weather in Paris?", max_turns=6)

    assert calls == ["Paris"]  # the model's call reached the Python function, once
    outputs: list[Any] = [item.output for item in result.new_items if isinstance(item, ToolCallOutputItem)]
    assert "Paris is sunny-21" in outputs
    handoffs = [item for item in result.new_items if isinstance(item, HandoffOutputItem)]
    assert [(h.source_agent.name, h.target_agent.name) for h in handoffs] == [("triage", "reporter")]
    assert result.last_agent is reporter
    assert result.final_output == FINAL
