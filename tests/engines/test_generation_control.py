"""How a generation ends, on both engines and on both worker paths (one at a time, batched).

- a grammar that completes on the last allowed token is a natural end ("stop"), not "length";
- a cancelled request stops during a long prompt evaluation, and what was evaluated stays cached;
- an engine failure reaches the log with the library's exception and traceback.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from backends.base import Backend, Chunk, EngineInfo, GenerationRequest, ResponseFormat, Token
from kernel.config import TierSettings
from kernel.errors import EngineError, engine_errors
from service.tiers.workers import GenerationWorker

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "enum": [1, 2, 3]}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


class CancelAfter(threading.Event):
    """A cancel event that reads as set from its (n+1)-th check on: cancels at a known point."""

    def __init__(self, checks: int) -> None:
        super().__init__()
        self.left = checks

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0


def run_worker(backend: Backend, requests: Sequence[GenerationRequest]) -> list[list[Chunk]]:
    """Submit every request at once to a real worker and collect each stream."""

    async def main() -> list[list[Chunk]]:
        streams = [worker.submit(r) for r in requests]
        return [[c async for c in s] for s in streams]

    worker = GenerationWorker("light", backend, max_queue=16)
    try:
        return asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        worker.close()


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


# -- MLX -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlx(tiny_mlx_model: Path) -> Iterator[Backend]:
    pytest.importorskip("mlx_lm")
    from backends.mlx.backend import MlxBackend

    backend = MlxBackend(TierSettings(name="light", n_ctx=2048, n_batch=8, max_batch=4), str(tiny_mlx_model))
    backend.load()
    yield backend
    backend.close()


def json_request(max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        prompt="Give me JSON:",
        max_tokens=max_tokens,
        temperature=0.0,
        response_format=ResponseFormat("json_schema", SCHEMA),
    )


def test_grammar_ending_on_the_last_token_is_stop(mlx: Backend) -> None:
    assert mlx.max_batch_size == 4
    free = list(mlx.stream(json_request(200)))
    n = free[-1].usage.completion_tokens  # type: ignore[union-attr]
    assert free[-1].finish_reason == "stop" and 3 < n < 200
    exact, short = list(mlx.stream(json_request(n))), list(mlx.stream(json_request(n - 1)))
    assert text_of(exact) == text_of(free) and exact[-1].finish_reason == "stop"
    assert short[-1].finish_reason == "length" and short[-1].usage.completion_tokens == n - 1  # type: ignore[union-attr]
    # The batched path ends the same way.
    batched = run_worker(mlx, [json_request(n), json_request(n - 1), json_request(200)])
    assert [text_of(c) for c in batched] == [text_of(exact), text_of(short), text_of(free)]
    assert [c[-1].finish_reason for c in batched] == ["stop", "length", "stop"]


def test_mlx_cancel_during_prompt_keeps_what_was_evaluated(mlx: Backend) -> None:
    mlx.prefix_cache.clear()  # type: ignore[attr-defined]
    prompt = mlx.encode("The weather today is sunny with a light wind. " * 12)
    assert len(prompt) > 60
    request = GenerationRequest(prompt=prompt, max_tokens=5, temperature=0.0)
    # n_batch=8: progress is reported after every 8 prompt tokens; the 4th check cancels.
    tokens = list(mlx.decode(prompt, request, 5, CancelAfter(3)))
    assert tokens == []
    assert mlx.prefix_cache.sequences() == [prompt[:24]]  # type: ignore[attr-defined]
    final = list(mlx.stream(request))[-1]
    assert final.usage is not None and final.usage.cached_tokens == 24


def test_mlx_preset_cancel_generates_nothing(mlx: Backend) -> None:
    prompt = mlx.encode("Once upon a time")
    assert list(mlx.decode(prompt, GenerationRequest(prompt=prompt, max_tokens=5), 5, CancelAfter(0))) == []


# -- llama.cpp -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(gemma_gguf: str) -> Iterator[Backend]:
    pytest.importorskip("llama_cpp")
    from backends.llamacpp.backend import LlamaCppBackend

    backend = LlamaCppBackend(TierSettings(name="light", n_ctx=1024, n_batch=16), gemma_gguf)
    backend.load()
    yield backend
    backend.close()


def test_llamacpp_cancel_between_prompt_batches(llama: Backend) -> None:
    llama.reset_prefix_cache()
    prompt = llama.encode("The weather today is sunny with a light wind. " * 10)
    assert len(prompt) > 64
    request = GenerationRequest(prompt=prompt, max_tokens=4, temperature=0.0)
    # n_batch=16: the cancel check before the 4th batch stops the evaluation after 48 tokens.
    assert list(llama.decode(prompt, request, 4, CancelAfter(3))) == []
    final = list(llama.stream(request))[-1]
    assert final.usage is not None and final.usage.cached_tokens == 48
    # Without a cancel event the same request is unaffected, and greedy output is stable.
    again = list(llama.stream(request, threading.Event()))
    assert again[-1].usage is not None and again[-1].usage.completion_tokens == 4


def test_llamacpp_grammar_ending_on_the_last_token_is_stop(llama: Backend) -> None:
    assert llama.max_batch_size == 4
    free = list(llama.stream(json_request(200)))
    n = free[-1].usage.completion_tokens  # type: ignore[union-attr]
    assert free[-1].finish_reason == "stop" and 3 < n < 200
    exact, short = list(llama.stream(json_request(n))), list(llama.stream(json_request(n - 1)))
    assert text_of(exact) == text_of(free) and exact[-1].finish_reason == "stop"
    assert short[-1].finish_reason == "length" and short[-1].usage.completion_tokens == n - 1  # type: ignore[union-attr]
    batched = run_worker(llama, [json_request(n), json_request(n - 1), json_request(200)])
    assert [text_of(c) for c in batched] == [text_of(exact), text_of(short), text_of(free)]
    assert [c[-1].finish_reason for c in batched] == ["stop", "length", "stop"]


# -- failures are logged with their cause --------------------------------------------------


class _FailingBackend(Backend):
    """Only `decode` matters here: it fails the way a library failure does inside an engine."""

    name = "failing"

    def load(self) -> None:
        pass

    def info(self) -> EngineInfo:
        return EngineInfo("failing", "cpu", 64)

    def encode(self, text: str) -> list[int]:
        return [1] * len(text.split())

    def detokenize(self, tokens: Sequence[int]) -> str:
        return " ".join("a" for _ in tokens)

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        return " ".join(m["content"] for m in messages)

    def decode(
        self, prompt: list[int], request: GenerationRequest, max_tokens: int, cancel: threading.Event | None = None
    ) -> Iterator[Token]:
        with engine_errors("failing"):
            raise ValueError("the library's own message")
        yield Token("")  # pragma: no cover - makes this a generator


def test_engine_error_is_logged_with_its_cause(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="service.tiers.workers")
    with pytest.raises(EngineError, match="The failing engine failed: ValueError"):
        run_worker(_FailingBackend(), [GenerationRequest(prompt="a b c")])
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert "the library's own message" in caplog.text and "Traceback" in caplog.text
