"""Freeing a llama.cpp model never pulls its memory from under a thread still using it: the
worker's decode (shutdown cancels it first and frees only once the thread has ended), a tokenizer
running beside the model (`/tokenize`, a request's preparation), a grammar compiling. In-process on
the real Gemma 3 270M GGUF: a use after free here would crash the test run or read freed memory."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import wait
from typing import Any

import pytest

pytest.importorskip("llama_cpp")

import llama_cpp

from backends.base import GenerationRequest, ResponseFormat
from backends.llamacpp.backend import LlamaCppBackend
from kernel.config import TierSettings
from kernel.errors import ModelUnavailableError
from service.tiers.workers import GenerationWorker


@pytest.fixture
def llama(gemma_gguf: str) -> Iterator[LlamaCppBackend]:
    """A model of its own: each test closes it."""
    backend = LlamaCppBackend(TierSettings(name="light", n_ctx=1024, n_batch=64, max_batch=2), gemma_gguf)
    backend.load()
    yield backend
    backend.close()  # a second close is a no-op


def endless(backend: LlamaCppBackend) -> GenerationRequest:
    """Counting on for far longer than any test waits: the end-of-generation tokens are barred."""
    ends = {backend.eos, llama_cpp.llama_vocab_eot(backend.vocab)} - {-1}
    return GenerationRequest(
        prompt="1, 2, 3, 4,", max_tokens=900, temperature=0.0, logit_bias=tuple((t, -100.0) for t in ends)
    )


def test_shutdown_cancels_a_running_generation_then_frees_the_model(llama: LlamaCppBackend) -> None:
    async def main() -> tuple[bool, list[str], BaseException | None]:
        worker = GenerationWorker("light", llama, max_queue=4)
        stream = worker.submit(endless(llama))
        texts = [(await anext(stream)).text]  # it is generating
        stopping = asyncio.ensure_future(worker.stop())
        error: BaseException | None = None
        try:
            async for chunk in stream:
                texts.append(chunk.text)
        except ModelUnavailableError as exc:
            error = exc
        return await stopping, texts, error

    stopped, texts, error = asyncio.run(asyncio.wait_for(main(), 60))
    assert stopped  # the thread ended within a step: the model may be freed
    assert isinstance(error, ModelUnavailableError) and error.code == "server_shutting_down"
    assert 0 < len(texts) < 900
    llama.close()


class NativeCalls:
    """Wraps a llama.cpp function to note when each call ends (inside whatever guards the caller
    holds), holding each call `hold` seconds inside first, with the model's memory in use."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, hold: float = 0.0) -> None:
        self.ended: list[float] = []
        self.inside = threading.Event()
        real = getattr(llama_cpp, name)

        def call(*args: Any) -> Any:
            self.inside.set()
            time.sleep(hold)  # a slow call: the close must wait for it, whatever it takes
            result = real(*args)
            self.ended.append(time.monotonic())
            return result

        monkeypatch.setattr(llama_cpp, name, call)


def test_close_waits_for_tokenizers_and_then_refuses_them(
    llama: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = NativeCalls(monkeypatch, "llama_tokenize", hold=0.05)
    refused: list[ModelUnavailableError] = []

    def tokenize() -> None:
        while True:
            try:
                llama.encode("The quick brown fox jumps over the lazy dog. " * 100)
            except ModelUnavailableError as exc:
                refused.append(exc)
                return

    threads = [threading.Thread(target=tokenize) for _ in range(2)]
    for thread in threads:
        thread.start()
    assert calls.inside.wait(30)
    llama.close()
    closed = time.monotonic()
    for thread in threads:
        thread.join(30)
    assert len(refused) == 2  # after the close: a 503, not freed memory
    assert max(calls.ended) < closed  # no tokenizer was still inside the model when it was freed


def test_close_waits_for_a_grammar_compile(llama: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = NativeCalls(monkeypatch, "llama_sampler_init_grammar", hold=0.3)
    # A schema of its own: compiled schemas are memoised.
    schema = {"type": "object", "properties": {f"field_{time.monotonic_ns()}": {"type": "string"}}}
    compiled = llama.grammars.submit(ResponseFormat("json_schema", schema))
    assert calls.inside.wait(30)  # compiling against the model's vocabulary
    llama.close()
    closed = time.monotonic()
    wait([compiled], timeout=60)
    assert compiled.exception() is None
    assert calls.ended[0] < closed  # the model was freed only after the compile
