"""End to end on a real model: Gemma 3 270M converted to an MLX folder, served by the MLX engine.

Gemma 3 270M is a base model, so the tests check structure, token accounting, streaming and that
our server's greedy text is mlx-lm's own (`mlx_lm.generate` on the same folder), alone and while
sharing a batch (Gemma's sliding-window layers use mlx-lm's rotating KV caches). The first run
converts the PyPI GGUF (~1 min, cached in ~/.cache/llmservice-test-models/); CPU decoding is slow.
Run with `./tests/run.sh -m slow`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

pytest.importorskip("mlx_lm")

from tests.live import LiveServer, live_server

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def folder() -> Path:
    from tests.fixtures.gemma_mlx import gemma_mlx_folder

    return gemma_mlx_folder()


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[LiveServer]:
    env = {
        "LIGHT_MODEL_PATH": str(folder),
        "LIGHT_BACKEND": "auto",
        "LIGHT_N_CTX": "1024",
        "LIGHT_MAX_TOKENS": str(MAX_TOKENS),
        "LIGHT_TEMPERATURE": "0",
        "LIGHT_REPEAT_PENALTY": "1.0",
    }
    with live_server(env, wait_for=("light",)) as live:
        assert live.app.state.registry.slots["light"].engine_name == "mlx"
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def expected(folder: Path) -> dict[str, str]:
    """mlx-lm's own greedy continuation of each prompt, in-process."""
    from mlx_lm import generate, load

    model, tokenizer = load(str(folder))
    return {p: generate(model, tokenizer, p, max_tokens=MAX_TOKENS) for p in PROMPTS}


def test_completion_is_mlx_lms_greedy_text(client: openai.OpenAI, expected: dict[str, str]) -> None:
    res = client.completions.create(model="light", prompt=PROMPTS[0])
    assert res.choices[0].text == expected[PROMPTS[0]]
    assert res.usage is not None and res.usage.completion_tokens <= MAX_TOKENS
    assert res.usage.prompt_tokens == 6  # <bos> + five words


def test_streamed_completion_matches(client: openai.OpenAI, expected: dict[str, str]) -> None:
    events = list(
        client.completions.create(model="light", prompt=PROMPTS[1], stream=True, stream_options={"include_usage": True})
    )
    assert "".join(e.choices[0].text for e in events if e.choices) == expected[PROMPTS[1]]
    assert events[-1].usage is not None and events[-1].usage.completion_tokens <= MAX_TOKENS


def test_concurrent_completions_share_a_batch_and_match(server: LiveServer, expected: dict[str, str]) -> None:
    texts: dict[str, Any] = {}

    def one(prompt: str) -> None:
        with server.client() as http:
            res = http.post("/v1/completions", json={"model": "light", "prompt": prompt})
            texts[prompt] = res.json()["choices"][0]["text"]

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert texts == expected


def test_chat_and_streaming_chat(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
    ]
    whole = client.chat.completions.create(model="light", messages=messages)  # type: ignore[arg-type]
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.prompt_tokens > 15
    events = list(
        client.chat.completions.create(
            model="light",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == choice.message.content
    final = events[-1].usage
    assert final is not None and final.completion_tokens == whole.usage.completion_tokens
    # The second request re-sent the same conversation: its prompt came from the prefix cache.
    assert final.prompt_tokens_details is not None
    assert final.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1
