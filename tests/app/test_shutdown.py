"""Shutdown cancels what the models are running and frees a model only once its thread has ended:
one still inside a step is left allocated (freed under the step, a native engine would crash)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from backends.base import GenerationRequest, Token
from backends.fake import FakeBackend
from kernel.config import TierSettings
from kernel.errors import ModelUnavailableError
from service.settings import parse_settings
from service.testing import counting, fake_engines
from service.tiers import workers
from service.tiers.families import GENERATION, EngineFactories
from service.tiers.registry import Registry


class _StuckBackend(FakeBackend):
    """Its second token comes only once the test lets it: a step that outlasts shutdown's wait."""

    def __init__(self, tier: TierSettings, model_path: str) -> None:
        super().__init__(tier, model_path)
        self.inside, self.release = threading.Event(), threading.Event()

    def decode(
        self, prompt: list[int], request: GenerationRequest, max_tokens: int, cancel: object = None
    ) -> Iterator[Token]:  # type: ignore[override]
        yield Token("4")
        self.inside.set()
        self.release.wait(30)
        yield Token("5", final=True)


async def shut_down_while_generating(engines: EngineFactories) -> tuple[FakeBackend, BaseException | None]:
    registry = Registry(parse_settings({"LIGHT_MODEL_PATH": "fake/light"}), engines)
    slot = registry.slots["light"]
    await registry.load(slot)
    backend = slot.engine
    assert isinstance(backend, FakeBackend)
    stream = GENERATION.generate(slot, GenerationRequest(prompt="Count", max_tokens=50))
    await anext(stream)  # it is generating
    if isinstance(backend, _StuckBackend):
        await asyncio.to_thread(backend.inside.wait, 10)
    await registry.close()
    try:
        async for _ in stream:
            pass
    except ModelUnavailableError as exc:
        return backend, exc
    return backend, None


def test_shutdown_cancels_a_generation_then_frees_its_model() -> None:
    engines = fake_engines(reply=counting, token_seconds=0.01)
    backend, error = asyncio.run(asyncio.wait_for(shut_down_while_generating(engines), 30))
    assert isinstance(error, ModelUnavailableError) and error.code == "server_shutting_down"
    assert not backend.loaded  # freed once the thread had left


def test_a_model_whose_thread_does_not_stop_is_not_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "STOP_SECONDS", 0.2)
    engines = EngineFactories(backend=_StuckBackend)
    backend, error = asyncio.run(asyncio.wait_for(shut_down_while_generating(engines), 30))
    assert isinstance(backend, _StuckBackend)
    try:
        assert isinstance(error, ModelUnavailableError)
        assert backend.loaded  # left allocated: the thread was still inside its step
    finally:
        backend.release.set()
