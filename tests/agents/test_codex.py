"""Codex CLI (the version pinned in tests/agents/package-lock.json) run headless against a live
server through the Responses API, as a user points it at us: a `config.toml` provider with
`wire_api = "responses"` and `model = "light"`.

- On the real Gemma tier (32k context): `codex exec` answers and exits 0, then `codex exec resume
  --last` does too, and its turn reuses the first turn's KV (Codex reports the server's
  `cached_tokens` as `cached_input_tokens` in its `--json` usage). Codex's prompt is ~9k tokens:
  two real requests only. Gemma 270M is a base model: on Codex's prompt it copies the tool list
  until max_tokens, and Codex fails a turn whose response is `incomplete`; `--output-schema` (a
  Codex flag for scripted runs) makes the answer a JSON object our grammar closes, so it ends.
- A full tool loop on a scripted fake engine: the "model" calls Codex's shell tool, Codex runs the
  command in a temp folder and sends the output back; then a tool of a `namespace` (Codex must
  recognise the call as its own); the model says "done", Codex exits 0.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.testing import fake_engines
from tests.live import live_server

# Node 22 and the agents, from `npm ci --prefix tests/agents` (tests/clients-latest.sh points
# LLMSERVICE_AGENTS_DIR at a folder of the newest releases).
BIN = Path(os.environ.get("LLMSERVICE_AGENTS_DIR") or Path(__file__).parent) / "node_modules" / ".bin"
SHELL_COMMAND = "echo 42 > out.txt"
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["hello", "goodbye"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


def _codex(url: str, home: Path, work: Path, *args: str, timeout: float = 600) -> list[dict[str, Any]]:
    """Run `codex exec --json ...` in `work`; its JSONL events. Fails with Codex's own output."""
    if not (BIN / "codex").exists() or not (BIN / "node").exists():
        pytest.fail(f"Codex CLI is not installed in {BIN.parent}: run `npm ci --prefix tests/agents`")
    config = home / "config.toml"
    if not config.exists():
        config.write_text(
            'model_provider = "llmservice"\nmodel = "light"\n\n[model_providers.llmservice]\nname = "llmservice"\n'
            f'base_url = "{url}/v1"\nwire_api = "responses"\nenv_key = "LLMSERVICE_API_KEY"\n'
        )
    env = {
        **os.environ,
        "CODEX_HOME": str(home),
        "LLMSERVICE_API_KEY": "unused",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # Node 22 first
    }
    done = subprocess.run(
        [str(BIN / "codex"), "exec", *args],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"codex exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _answer(events: list[dict[str, Any]]) -> str:
    return "".join(
        e["item"].get("text", "")
        for e in events
        if e.get("type") == "item.completed" and e["item"].get("type") == "agent_message"
    )


def _usage(events: list[dict[str, Any]]) -> dict[str, int]:
    turns = [e for e in events if e.get("type") == "turn.completed"]
    assert turns, events
    return turns[-1]["usage"]  # type: ignore[no-any-return]


def test_two_turns_on_gemma_reuse_the_kv(gemma_gguf: str, tmp_path: Path) -> None:
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    schema = tmp_path / "answer.schema.json"
    schema.write_text(json.dumps(ANSWER_SCHEMA))
    flags = ("--json", "--skip-git-repo-check", "--output-schema", str(schema))
    env = {"LIGHT_MODEL_PATH": gemma_gguf, "LIGHT_N_CTX": "32768", "LIGHT_MAX_BATCH": "1", "LIGHT_TEMPERATURE": "0"}
    with live_server(env, wait_for=("light",)) as server:
        first = _codex(server.url, home, work, *flags, "Reply with the single word: hello")
        assert json.loads(_answer(first))["answer"] in ("hello", "goodbye")
        second = _codex(server.url, home, work, "resume", *flags, "--last", "Say it once more.")
        assert json.loads(_answer(second))["answer"] in ("hello", "goodbye")
    usage = _usage(second)
    # The second turn's prompt starts with the whole first turn: its KV was kept, not recomputed.
    assert usage["cached_input_tokens"] > _usage(first)["input_tokens"] // 2, usage


def _scripted(prompt: str) -> str:
    """The model's side of the loop (the fake engine's prompt is one `role: content` line per
    message): call Codex's shell tool, then one of its namespaced tools (offered to the model as
    `multi_agent_v1.close_agent`), then finish."""
    outputs = prompt.count("\ntool: ")
    if outputs == 0:
        call = {"name": "exec_command", "arguments": {"cmd": SHELL_COMMAND}}
        return f"<think>A shell command does it.</think><tool_call>{json.dumps(call)}</tool_call>"
    if outputs == 1:
        call = {"name": "multi_agent_v1.close_agent", "arguments": {"target": "no-such-agent"}}
        return f"<tool_call>{json.dumps(call)}</tool_call>"
    return "done"


def test_tool_loop_runs_the_command_and_finishes(tmp_path: Path) -> None:
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    prompts: list[str] = []

    def reply(prompt: str) -> str:
        prompts.append(prompt)
        return _scripted(prompt)

    # The fake counts a byte a token: room for Codex's ~40 kB prompt.
    env = {"LIGHT_MODEL_PATH": "fake/script", "LIGHT_N_CTX": "200000", "LIGHT_REASONING_PARSER": "think"}
    with live_server(env, engines=fake_engines(reply=reply)) as server:
        events = _codex(
            server.url,
            home,
            work,
            "--json",
            "--skip-git-repo-check",
            "--dangerously-bypass-approvals-and-sandbox",
            "Create out.txt holding 42.",
        )
    assert (work / "out.txt").read_text().strip() == "42"
    commands = [
        e["item"] for e in events if e.get("type") == "item.completed" and e["item"]["type"] == "command_execution"
    ]
    assert len(commands) == 1 and SHELL_COMMAND in commands[0]["command"] and commands[0]["exit_code"] == 0
    assert _answer(events) == "done"
    # Thinking reaches Codex as the reasoning item's summary (what it shows), and stays out of the next prompt.
    thoughts = [
        e["item"]["text"] for e in events if e.get("type") == "item.completed" and e["item"]["type"] == "reasoning"
    ]
    assert thoughts == ["A shell command does it."] and "A shell command" not in prompts[1]
    assert len(prompts) == 3 and "\ntool: " in prompts[1]  # the command's result went back to the model
    # Codex ran its own close_agent on the namespaced call (an unknown name gets "unsupported call").
    answer = prompts[2].rsplit("\ntool: ", 1)[1]
    assert "no-such-agent" in answer and "unsupported call" not in answer, answer
