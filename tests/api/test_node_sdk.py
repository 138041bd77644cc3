"""The openai Node SDK (tests/node, installed by tests/run.sh from its package-lock.json) against a
real engine: chat, streaming with usage, forced tool calls (plain and reassembled from a stream),
logprobs and the Responses API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.live import LiveServer

# tests/clients-latest.sh points this at a throwaway folder with the newest SDK (and client.mjs).
NODE_DIR = Path(os.environ.get("LLMSERVICE_NODE_DIR") or Path(__file__).resolve().parents[1] / "node")


def test_openai_node_sdk(engine_server: LiveServer) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed for the Node SDK test (tests/run.sh installs its packages with npm)"
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.fail(f"{NODE_DIR}/node_modules is missing: run tests/run.sh (it runs npm ci in tests/node)")
    done = subprocess.run(
        [node, str(NODE_DIR / "client.mjs"), engine_server.url], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)

    assert out["chat"]["content"] and out["chat"]["finish"] in ("stop", "length")
    assert out["stream"]["content"] and out["stream"]["usage"]["completion_tokens"] >= 1
    for key in ("tool", "tool_stream"):
        assert out[key]["finish"] == "tool_calls", key
        [call] = out[key]["calls"]
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Oslo")
    tokens = out["logprobs"]["content"]
    assert len(tokens) == 3 and all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in tokens)
    assert out["response"]["text"] and out["response"]["status"] in ("completed", "incomplete")
    assert out["response"]["usage"]["input_tokens"] > 0
