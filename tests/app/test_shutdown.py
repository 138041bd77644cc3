"""Shutdown cancels what the models are running and frees a model only once its thread has ended:
one still inside a step is left allocated (freed under the step, a native engine would crash)."""

from __future__ import annotations

import asyncio

import pytest

from backends.base import GenerationRequest
from backends.fake import FakeBackend
from kernel.errors import ModelUnavailableError
from service.settings import parse_settings
from service.testing import counting, fake_engines
from service.tiers import workers
from service.tiers.families import GENERATION
from service.tiers.registry import Registry


async def shut_down_while_generating(token_seconds: float) -> tuple[FakeBackend, BaseException | None]:
    registry = Registry(
        parse_settings({"LIGHT_MODEL_PATH": "fake/light"}), fake_engines(reply=counting, token_seconds=token_seconds)
    )
    slot = registry.slots["light"]
    await registry.load(slot)
    backend = slot.engine
    assert isinstance(backend, FakeBackend)
    stream = GENERATION.generate(slot, GenerationRequest(prompt="Count", max_tokens=50))
    await anext(stream)  # it is generating
    await registry.close()
    try:
        async for _ in stream:
            pass
    except ModelUnavailableError as exc:
        return backend, exc
    return backend, None


def test_shutdown_cancels_a_generation_then_frees_its_model() -> None:
    backend, error = asyncio.run(asyncio.wait_for(shut_down_while_generating(0.01), 30))
    assert isinstance(error, ModelUnavailableError) and error.code == "server_shutting_down"
    assert not backend.loaded  # freed once the thread had left


def test_a_model_whose_thread_does_not_stop_is_not_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "STOP_SECONDS", 0.2)  # far less than one token takes
    backend, error = asyncio.run(asyncio.wait_for(shut_down_while_generating(2.0), 30))
    assert isinstance(error, ModelUnavailableError)
    assert backend.loaded  # left allocated: the thread was still inside a token
