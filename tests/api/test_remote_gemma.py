"""A remote tier over a real model's server (issue 28): llmservice on the Gemma 3 270M GGUF in its
own process as the upstream. What a client gets through the pool is what it gets from the upstream
directly: the same greedy text, the same token logprobs, the same usage."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.live import LiveServer, live_server
from tests.upstreams import Upstream


@pytest.fixture(scope="module")
def gemma_pool(gemma_gguf: str) -> Iterator[tuple[LiveServer, Upstream]]:
    upstream = Upstream(env={"LIGHT_MODEL_PATH": gemma_gguf, "LIGHT_N_CTX": "2048", "LOG_LEVEL": "WARNING"})
    try:
        upstream.wait()
        env = {"LIGHT_BACKEND": "remote", "LIGHT_REMOTE_URLS": upstream.url}
        with live_server(env, wait_for=("light",)) as front:
            yield front, upstream
    finally:
        upstream.kill()


def test_same_answer_and_logprobs_as_the_upstream(gemma_pool: tuple[LiveServer, Upstream]) -> None:
    front, upstream = gemma_pool
    chat = {
        "model": "light",
        "messages": [{"role": "user", "content": "Name three colours."}],
        "temperature": 0,
        "max_tokens": 12,
        "logprobs": True,
        "top_logprobs": 2,
    }
    direct = httpx.post(f"{upstream.url}/chat/completions", json=chat, timeout=60).json()
    pooled = httpx.post(f"{front.url}/v1/chat/completions", json=chat, timeout=60).json()
    assert pooled["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert pooled["choices"][0]["logprobs"] == direct["choices"][0]["logprobs"]
    assert pooled["choices"][0]["finish_reason"] == direct["choices"][0]["finish_reason"] == "length"
    assert pooled["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    assert pooled["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"] == 12
    # The pool took the context length from the upstream's model listing.
    assert httpx.get(f"{front.url}/v1/models").json()["data"][0]["context_length"] == 2048
