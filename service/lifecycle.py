"""Operator control of model lifecycle: admin load/unload, load-by-path, idle unloading.

The registry does the loading and the draining unload; this module decides *when* (keep-alive,
pinning, admin requests) and checks what an admin request may load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec

from kernel.errors import InvalidRequestError, ModelUnavailableError, TierNotConfiguredError
from service.security import allowed_model_path
from service.settings import Settings
from service.tiers.registry import Registry
from service.tiers.slots import AdapterRecord, TierSlot, TierState

log = logging.getLogger(__name__)


class Lifecycle:
    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.retune()

    def retune(self) -> None:
        """(Re)start the idle unloader for the tiers' current KEEP_ALIVE values (they change live)."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        keep_alives = [s.settings.keep_alive for s in self.registry.slots.values() if s.settings.keep_alive > 0]
        if keep_alives:
            tick = min(1.0, max(0.05, min(keep_alives) / 4))
            self._reaper = asyncio.create_task(self._unload_idle(tick), name="idle-unloader")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper

    # -- admin actions -----------------------------------------------------------------------
    async def load(self, model_id: str, model_path: str | None = None) -> tuple[TierSlot, str | None]:
        """Load a configured tier, or put the model at `model_path` (inside MODELS_DIR) into it.
        Returns the slot and the id of the model a new one replaced."""
        slot = self.registry.resolve(model_id)
        if model_path:
            path = allowed_model_path(self.settings.models_dir, model_path)
            if path != slot.settings.model_path:
                return slot, await self._replace_model(slot, path)
        elif slot.state is TierState.ABSENT:
            raise TierNotConfiguredError(slot.name)
        await self.registry.load(slot)
        if slot.state is TierState.FAILED:
            raise ModelUnavailableError(f"Tier {slot.name} failed to load: {slot.error}")
        return slot, None

    async def load_adapter(self, model_id: str, name: str, path: str) -> tuple[TierSlot, AdapterRecord]:
        """Load a LoRA adapter at `path` (inside MODELS_DIR, like a model) into a generation tier."""
        slot = self.registry.generation_slot(model_id)
        target = allowed_model_path(self.settings.models_dir, path, param="path")
        return slot, await self.registry.load_adapter(slot, name, target)

    async def unload_adapter(self, model_id: str, name: str) -> tuple[TierSlot, AdapterRecord]:
        slot = self.registry.generation_slot(model_id)
        return slot, await self.registry.unload_adapter(slot, name)

    async def unload(self, model_id: str) -> tuple[TierSlot, int]:
        """Unload after the requests in flight finish; returns the slot and how many there were."""
        slot = self.registry.resolve(model_id)
        if slot.state is TierState.ABSENT:
            raise TierNotConfiguredError(slot.name)
        if slot.settings.pin:
            raise InvalidRequestError(
                f"Tier {slot.name} is pinned ({slot.name.upper()}_PIN=true) and is never unloaded",
                param="model",
                code="model_pinned",
            )
        return slot, await self.registry.unload(slot)

    async def _replace_model(self, slot: TierSlot, path: str) -> str | None:
        if slot.settings.pin and slot.state is TierState.LOADED:
            raise InvalidRequestError(
                f"Tier {slot.name} is pinned ({slot.name.upper()}_PIN=true): its model cannot be replaced",
                param="model",
                code="model_pinned",
            )
        log.info("Tier %s: loading %s for an admin request", slot.name, path)
        # The new model loads beside the old one, which serves until the new one is ready.
        settings = msgspec.structs.replace(slot.settings, model_path=path, model_name=None)
        return await self.registry.replace(slot, settings)

    # -- idle unloading ------------------------------------------------------------------------
    async def _unload_idle(self, tick: float) -> None:
        while True:
            await asyncio.sleep(tick)
            now = time.time()
            for slot in self.registry.configured():
                keep_alive = slot.settings.keep_alive
                if keep_alive <= 0 or slot.settings.pin or slot.state is not TierState.LOADED or slot.in_flight:
                    continue
                if now - last_active(slot) >= keep_alive:
                    log.info("Tier %s: idle for %d s (%s_KEEP_ALIVE)", slot.name, keep_alive, slot.name.upper())
                    try:
                        await self.registry.unload(slot)
                    except Exception:  # the unloader must outlive one failed unload
                        log.exception("Tier %s: idle unload failed", slot.name)


def last_active(slot: TierSlot) -> float:
    """Wall-clock time of the last request start or end on this model (or its load)."""
    finished = slot.worker.finished_at if slot.worker else 0.0
    return max(slot.last_used or 0.0, slot.loaded_at or 0.0, finished)
