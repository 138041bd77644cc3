"""Claude Code (the npm package pinned in tests/agents/package-lock.json, on the Node 22 beside it)
run headless against a live server, as a user points it at us: `ANTHROPIC_BASE_URL`, a model name,
`claude -p`. One run answers on the real Gemma tier with a 32k context and a second turn reuses the
first's KV; one run goes through a whole tool loop on a scripted fake engine."""

from __future__ import annotations

import functools
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.testing import fake_engines
from tests.live import LiveServer, live_server

# Node 22 and the agents, from `npm ci --prefix tests/agents` (tests/clients-latest.sh points
# LLMSERVICE_AGENTS_DIR at a folder of the newest releases).
BIN = Path(os.environ.get("LLMSERVICE_AGENTS_DIR") or Path(__file__).resolve().parent) / "node_modules" / ".bin"


def claude(
    url: str, home: Path, cwd: Path, *args: str, max_output: int | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`claude <args>` headless against `url`, in `cwd`, with only the environment a user sets;
    `max_output`: CLAUDE_CODE_MAX_OUTPUT_TOKENS (a user's setting), else Claude Code's 32000."""
    for name in ("claude", "node"):
        if not (BIN / name).exists():
            pytest.fail(f"{BIN / name} is missing: run `npm ci --prefix tests/agents` (Claude Code needs Node 22)")
    env = {
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",  # Node 22 first: Claude Code refuses older ones
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": "not-needed",
        "ANTHROPIC_SMALL_FAST_MODEL": "light",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    } | ({"CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(max_output)} if max_output else {})
    return subprocess.run(
        [str(BIN / "claude"), *args, "--model", "light"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def prefix_reuse(server: LiveServer) -> dict[str, int]:
    """The light tier's prompt-reuse counters from the server's own `/v1/cache/stats`."""
    stats = httpx.get(f"{server.url}/v1/cache/stats").json()
    return stats["prefix"]["by_tier"].get("light", {"hits": 0, "misses": 0, "reused_tokens": 0})  # type: ignore[no-any-return]


def answered_usages(home: Path) -> dict[str, dict[str, int]]:
    """The usage of every answer Claude Code got, as it recorded them in its session transcripts
    (entry id → usage), in the order they came."""
    usages: dict[str, dict[str, int]] = {}
    for transcript in sorted((home / ".claude" / "projects").glob("*/*.jsonl"), key=lambda p: p.stat().st_mtime):
        for line in transcript.read_text().splitlines():
            entry = json.loads(line)
            usage = (entry.get("message") or {}).get("usage")
            if entry.get("type") == "assistant" and usage and usage["input_tokens"] + usage["cache_read_input_tokens"]:
                usages.setdefault(entry["uuid"], usage)
    return usages


def finished(run: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """Claude Code's JSON result of a run that got its answers: exit 0, or (a base model never ends
    its turn) Claude Code's own verdict that the answer ran into its output cap; anything else
    (a 400, a retry that gave up, a crash) fails the test."""
    assert run.stdout.strip(), run.stderr
    result: dict[str, object] = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0 or result.get("api_error") == "max_output_tokens", (run.returncode, result, run.stderr)
    assert result.get("api_error_status") is None, result  # no HTTP error from us
    return result


def test_two_turns_on_gemma_reuse_the_first_turns_kv(gemma_gguf: str, tmp_path: Path) -> None:
    """Claude Code exactly as users run it (its whole system prompt and tools, ~12k Gemma tokens),
    then `--continue`: the second turn's prompt starts with the first's, so the engine reuses its KV.
    Gemma 3 270M here is a base model that never ends its turn: each answer runs to the output cap
    (CLAUDE_CODE_MAX_OUTPUT_TOKENS, a user's setting), and Claude Code asks it to resume a few
    times (cheap: those reuse the KV too) before it gives up."""
    env = {
        "LIGHT_MODEL_PATH": gemma_gguf,
        "LIGHT_BACKEND": "llamacpp",
        "LIGHT_N_CTX": "32768",
        "ENABLE_CACHE": "false",  # reuse must come from the engine's KV, not the response cache
    }
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    ask = ("-p", "--output-format", "json")
    with live_server(env, wait_for=("light",)) as server:
        finished(claude(server.url, home, work, *ask, "Reply with the single word: hello", max_output=16))
        first = answered_usages(home)
        assert first, "Claude Code recorded no answer"
        before = prefix_reuse(server)
        finished(claude(server.url, home, work, *ask, "Now reply with: again", "--continue", max_output=16))
        after = prefix_reuse(server)
        failed = httpx.get(f"{server.url}/v1/stats").json()["requests"]["failed"]
    assert failed == 0
    second = [usage for key, usage in answered_usages(home).items() if key not in first]
    assert second, "the second turn got no answer"
    turn_one = next(iter(first.values()))
    # What Claude Code saw: the second turn's first request read the first turn's prompt from the cache.
    assert second[0]["cache_read_input_tokens"] >= 0.9 * turn_one["input_tokens"], (turn_one, second[0])
    # What the server counted: every request of the second turn reused a prefix.
    assert after["hits"] - before["hits"] == len(second) and after["misses"] == before["misses"], (before, after)


CALL = (
    '<tool_call>{"name": "Bash", "arguments": {"command": "echo 42 > out.txt", "description": "Write 42"}}</tool_call>'
)


def scripted_reply(prompts: list[str], prompt: str) -> str:
    """The script: call Bash to write out.txt; once a tool result is in the prompt, say "done"."""
    prompts.append(prompt)
    return "done" if "\ntool: " in prompt else CALL


@pytest.fixture
def scripted_server() -> Iterator[tuple[LiveServer, list[str]]]:
    prompts: list[str] = []
    engines = fake_engines(reply=functools.partial(scripted_reply, prompts))
    env = {"LIGHT_MODEL_PATH": "fake/script", "LIGHT_N_CTX": "65536", "LIGHT_TOOL_PARSER": "hermes"}
    with live_server(env, wait_for=("light",), engines=engines) as server:
        yield server, prompts


def test_a_tool_loop_runs_the_tool_and_finishes(scripted_server: tuple[LiveServer, list[str]], tmp_path: Path) -> None:
    server, prompts = scripted_server
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    done = claude(
        server.url, home, work, "-p", "Write 42 into out.txt", "--allowedTools", "Bash", "--output-format", "json"
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert (work / "out.txt").read_text().strip() == "42"  # Claude Code ran the call it was given
    result = json.loads(done.stdout)
    assert result["is_error"] is False and result["result"].strip() == "done", result
    assert result["num_turns"] >= 2
    [answered] = [p for p in prompts if "\ntool: " in p]  # the tool's result came back, once
    assert "Write 42 into out.txt" in answered
