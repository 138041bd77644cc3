"""Admission on the worker, on the fake engine: a request's prompt is rendered and tokenised off the
model's thread, so streams already decoding never wait on a new prompt; what must still hold when
the request starts decoding (its adapter is loaded) is checked again there."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from backends.base import GenerationRequest, Token
from backends.fake import FakeBackend
from kernel.config import TierSettings
from kernel.errors import AdapterNotFoundError
from service.testing import counting
from service.tiers.workers import GenerationWorker, Job


class RecordingBackend(FakeBackend):
    """Records the threads prompts are prepared and decoded on; `gate`, while clear, holds the
    chat template of a conversation that says "slow"."""

    def __init__(self, max_batch: int, token_seconds: float = 0.0) -> None:
        super().__init__(
            TierSettings(name="light", n_ctx=4096), "fake/light", reply=counting, token_seconds=token_seconds,
            max_batch=max_batch,
        )  # fmt: skip
        self.prepared_on: list[str] = []
        self.decoded_on: list[str] = []
        self.decoded = 0  # tokens decoded so far, by every request
        self.gate = threading.Event()
        self.rendering = threading.Event()
        self.adapters = {"support"}

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        if any(m.get("content") == "slow" for m in messages):
            self.rendering.set()
            assert self.gate.wait(60)
        return super().render_chat(messages, tools, variables)

    def prepare(self, request: GenerationRequest) -> Any:
        self.prepared_on.append(threading.current_thread().name)
        return super().prepare(request)

    def decode(
        self, prompt: list[int], request: GenerationRequest, max_tokens: int, cancel: threading.Event | None = None
    ) -> Iterator[Token]:
        self.decoded_on.append(threading.current_thread().name)
        for token in super().decode(prompt, request, max_tokens, cancel):
            self.decoded += 1
            yield token

    def adapter_names(self) -> list[str]:
        return sorted(self.adapters)


def chat(content: str, max_tokens: int = 3, adapter: str | None = None) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": content},), max_tokens=max_tokens, adapter=adapter)


async def text(stream: Any) -> str:
    return "".join([c.text async for c in stream])


@pytest.mark.parametrize("max_batch", [1, 3])
def test_prompts_are_prepared_off_the_models_thread(max_batch: int) -> None:
    backend = RecordingBackend(max_batch)
    worker = GenerationWorker("light", backend, max_queue=8)

    async def main() -> list[str]:
        return await asyncio.gather(*(text(worker.submit(chat(f"Hi {i}"))) for i in range(4)))

    try:
        assert asyncio.run(asyncio.wait_for(main(), 30)) == ["4,5"] * 4
    finally:
        worker.close()
    assert len(backend.prepared_on) == 4 and len(backend.decoded_on) == 4
    assert set(backend.decoded_on) == {"llm-worker-light"}
    assert all(name.startswith("llm-prepare-light") for name in backend.prepared_on), backend.prepared_on


def test_a_slow_template_does_not_stall_running_streams() -> None:
    backend = RecordingBackend(max_batch=2, token_seconds=0.001)
    worker = GenerationWorker("light", backend, max_queue=8)

    async def main() -> str:
        running = worker.submit(GenerationRequest(prompt="count", max_tokens=900))
        await anext(aiter(running))
        held = worker.submit(chat("slow"))
        assert await asyncio.to_thread(backend.rendering.wait, 30)
        # While the new request's template is held, the running stream keeps decoding.
        before, deadline = backend.decoded, time.monotonic() + 20
        while backend.decoded < before + 50:
            assert time.monotonic() < deadline, "the running stream stalled while a prompt was rendered"
            await asyncio.sleep(0.01)
        assert not backend.gate.is_set()
        backend.gate.set()
        running.cancel()
        return await text(held)

    try:
        assert asyncio.run(asyncio.wait_for(main(), 60)) == "4,5"
    finally:
        backend.gate.set()
        worker.close()


def test_an_adapter_unloaded_after_the_prompt_was_prepared_is_a_404() -> None:
    backend = RecordingBackend(max_batch=2)
    worker = GenerationWorker("light", backend, max_queue=8)
    entered, release = threading.Event(), threading.Event()

    def unload_when_released() -> None:
        entered.set()
        assert release.wait(30)
        backend.adapters.discard("support")

    async def main() -> None:
        maintenance = asyncio.ensure_future(worker.run(unload_when_released))
        assert await asyncio.to_thread(entered.wait, 30)
        stream = worker.submit(chat("Hi", adapter="support"))
        while worker.preparing:  # noqa: ASYNC110 - polled: prepared (the adapter was loaded then), queued
            await asyncio.sleep(0.01)
        release.set()
        await maintenance
        with pytest.raises(AdapterNotFoundError):
            await text(stream)

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        release.set()
        worker.close()
    assert backend.prepared_on and not backend.decoded_on


@pytest.mark.parametrize("max_batch", [1, 3])
def test_a_stream_ends_only_once_its_job_is_counted_finished(max_batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that has read its whole answer and at once asks for a model needing this one's memory
    must find this model idle: seen busy, the load was refused with a 503 (MEMORY_BUDGET)."""
    backend = RecordingBackend(max_batch)
    worker = GenerationWorker("light", backend, max_queue=8)
    seen: list[tuple[int, int]] = []  # (in flight, processed) as each stream's end is handed over
    put = Job.put

    def recording_put(job: Job, event: Any) -> None:
        if event is None:
            seen.append((worker.in_flight, worker.processed))
        put(job, event)

    monkeypatch.setattr(Job, "put", recording_put)

    async def main() -> None:
        assert await text(worker.submit(chat("Hi"))) == "4,5"
        with pytest.raises(AdapterNotFoundError):  # fails while its prompt is prepared
            await text(worker.submit(chat("Hi", adapter="absent")))

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        worker.close()
    assert seen == [(0, 1), (0, 2)]
