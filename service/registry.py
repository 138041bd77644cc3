"""The registry: tiers → loaded engines, their workers and lifecycle. Controllers only talk to this."""

from __future__ import annotations

import asyncio
import enum
import fnmatch
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from backends.base import Backend, GenerationRequest
from backends.factory import create_backend
from service.errors import LLMServiceError, ModelNotFoundError, ModelUnavailableError
from service.model_paths import model_file_name, resolve_model_path
from service.settings import GENERATION_TIERS, TIERS, Settings, TierSettings
from service.workers import GenerationWorker, JobStream

log = logging.getLogger(__name__)


class TierState(enum.StrEnum):
    ABSENT = "absent"  # no MODEL_PATH
    AVAILABLE = "available"  # configured, not loaded
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class TierNotConfiguredError(LLMServiceError):
    status = 404
    type = "model_error"

    def __init__(self, tier: str) -> None:
        super().__init__(f"No models available for tier: {tier}", param="model", code="model_not_available")


_QUANT_SUFFIX = re.compile(r"([-_.](i?q\d\w*|f16|f32|bf16|fp16|\d+bit)|\.gguf|-gguf)$", re.IGNORECASE)
_SIZE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)([bm])(?![a-z])", re.IGNORECASE)


def model_name(tier: TierSettings) -> str:
    """A readable model name from the setting: `gemma-3-270m-q4_k_m.gguf` → `gemma-3-270m`."""
    if tier.model_name:
        return tier.model_name
    name = model_file_name(tier.model_path or "").lower()
    while (stripped := _QUANT_SUFFIX.sub("", name)) != name:
        name = stripped
    return name


@dataclass(eq=False)
class TierSlot:
    name: str
    settings: TierSettings
    state: TierState
    model: str = ""
    error: str | None = None
    engine: Any = None  # Backend, Embedder or Reranker once loaded
    worker: GenerationWorker | None = None
    engine_name: str | None = None
    device: str | None = None
    context_length: int | None = None
    load_seconds: float | None = None
    loaded_at: float | None = None
    last_used: float | None = None
    requests: int = 0
    load_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return f"{self.name}/{self.model}"

    def describe(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "model": self.id if self.state is not TierState.ABSENT else None,
            "engine": self.engine_name,
            "device": self.device,
            "context_length": self.context_length,
            "error": self.error,
            "queued": self.worker.waiting if self.worker else 0,
            "busy": bool(self.worker and self.worker.busy),
        }


class Registry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.time()
        self.slots: dict[str, TierSlot] = {}
        for name in TIERS:
            tier = settings.tier(name)
            state = TierState.AVAILABLE if tier.configured else TierState.ABSENT
            self.slots[name] = TierSlot(name, tier, state, model=model_name(tier) if tier.configured else "")

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        for slot in self.configured():
            if slot.name in GENERATION_TIERS and slot.settings.extras.get("preload", "true").lower() != "false":
                self._begin_load(slot)

    async def close(self) -> None:
        for slot in self.slots.values():
            if slot.load_task and not slot.load_task.done():
                slot.load_task.cancel()
        await asyncio.to_thread(self._close_all)

    def _close_all(self) -> None:
        for slot in self.slots.values():
            self._unload_sync(slot)

    def _unload_sync(self, slot: TierSlot) -> None:
        if slot.worker is not None:
            slot.worker.close()
            slot.worker = None
        if slot.engine is not None:
            slot.engine.close()
            slot.engine = None
        if slot.state is TierState.LOADED:
            slot.state = TierState.AVAILABLE

    def _begin_load(self, slot: TierSlot) -> asyncio.Task[None]:
        if slot.load_task is None or (slot.load_task.done() and slot.state is not TierState.LOADED):
            slot.state = TierState.LOADING
            slot.error = None
            slot.load_task = asyncio.create_task(self._load(slot), name=f"load-{slot.name}")
        return slot.load_task

    async def _load(self, slot: TierSlot) -> None:
        log.info("Tier %s: loading %s", slot.name, slot.settings.model_path)
        started = time.monotonic()
        try:
            await asyncio.to_thread(self._load_sync, slot)
        except LLMServiceError as exc:
            slot.state, slot.error = TierState.FAILED, exc.message
            log.error("Tier %s: failed to load: %s", slot.name, exc.message)
            return
        except Exception as exc:
            slot.state, slot.error = TierState.FAILED, f"{type(exc).__name__}: {exc}"
            log.exception("Tier %s: failed to load", slot.name)
            return
        slot.load_seconds = time.monotonic() - started
        slot.loaded_at = time.time()
        slot.state = TierState.LOADED
        log.info("Tier %s: %s loaded on %s in %.1f s", slot.name, slot.id, slot.engine_name, slot.load_seconds)

    def _load_sync(self, slot: TierSlot) -> None:
        path = resolve_model_path(slot.settings.model_path or "")
        if slot.name not in GENERATION_TIERS:
            raise ModelUnavailableError(f"Tier {slot.name}: this tier kind is not served yet")
        backend: Backend = create_backend(slot.settings, path)
        backend.load()
        info = backend.info()
        slot.engine, slot.engine_name, slot.device = backend, info.engine, info.device
        slot.context_length = info.context_length
        slot.worker = GenerationWorker(slot.name, backend, slot.settings.max_queue)

    async def ensure_loaded(self, slot: TierSlot) -> TierSlot:
        if slot.state is TierState.ABSENT:
            raise TierNotConfiguredError(slot.name)
        if slot.state is not TierState.LOADED:
            await asyncio.shield(self._begin_load(slot) if slot.state is not TierState.FAILED else _done())
        if slot.state is TierState.FAILED:
            raise ModelUnavailableError(f"Tier {slot.name} failed to load: {slot.error}")
        slot.last_used = time.time()
        slot.requests += 1
        return slot

    # -- routing ---------------------------------------------------------------------------
    def configured(self) -> list[TierSlot]:
        return [s for s in self.slots.values() if s.state is not TierState.ABSENT]

    def resolve(self, model: str) -> TierSlot:
        """Tier name, `tier/name`, the model's own name, or the seed's name patterns."""
        key = model.strip().lower()
        if key in self.slots:
            return self.slots[key]
        tier, _, rest = key.partition("/")
        if rest and tier in self.slots:
            return self.slots[tier]
        for slot in self.configured():
            if key in (slot.model.lower(), slot.id.lower()):
                return slot
        if routed := self._by_pattern(key):
            return routed
        available = ", ".join(s.id for s in self.configured()) or "none"
        raise ModelNotFoundError(f"Model not found: {model}. Available models: {available}")

    def _by_pattern(self, key: str) -> TierSlot | None:
        if any(fnmatch.fnmatch(key, p) for p in ("*rerank*", "*cross-encoder*")):
            return self.slots["reranker"]
        if any(fnmatch.fnmatch(key, p) for p in ("*embed*", "*bge*", "*e5*")):
            return self.slots["embedding"]
        if size := _SIZE.search(key):
            wanted = size.group(0).lower()
            for slot in self.configured():
                if slot.name in GENERATION_TIERS and (m := _SIZE.search(slot.model)) and m.group(0).lower() == wanted:
                    return slot
        return None

    async def generation(self, model: str) -> TierSlot:
        slot = self.resolve(model)
        if slot.state is TierState.ABSENT:
            raise TierNotConfiguredError(slot.name)
        if slot.name not in GENERATION_TIERS:
            raise ModelNotFoundError(f"Model {model} is served by the {slot.name} tier, which does not generate text")
        return await self.ensure_loaded(slot)

    async def generate(self, slot: TierSlot, request: GenerationRequest) -> JobStream:
        if slot.worker is None:
            raise ModelUnavailableError(f"Tier {slot.name} is not loaded")
        return slot.worker.submit(request)

    # -- views -----------------------------------------------------------------------------
    def uptime(self) -> float:
        return time.time() - self.started

    def health(self) -> dict[str, Any]:
        return {name: slot.describe() for name, slot in self.slots.items() if slot.state is not TierState.ABSENT}


async def _done() -> None:
    return None
