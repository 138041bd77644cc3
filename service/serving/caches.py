"""The caches as an operator sees them: the response cache and the generation tiers' prefix caches."""

from __future__ import annotations

from typing import Any, Literal

from service.cache import ResponseCache
from service.metrics import Telemetry
from service.tiers.families import FAMILIES, GENERATION
from service.tiers.registry import Registry
from service.tiers.slots import TierState


class Caches:
    def __init__(self, cache: ResponseCache, registry: Registry, telemetry: Telemetry) -> None:
        self._cache = cache
        self._registry = registry
        self._telemetry = telemetry

    def stats(self) -> dict[str, Any]:
        return {
            "response": self._cache.stats(),
            "prefix": self._telemetry.prefix_stats(),
            "prompt": self._telemetry.prompt_cache_stats(),  # the prompt cache tiers, per generation tier
        }

    async def clear(self, target: Literal["response", "prefix", "all"]) -> dict[str, Any]:
        """What was cleared: the response cache's entries (flushed to disk too), and the loaded
        generation tiers whose prefix caches were reset (on their model's thread)."""
        cleared: dict[str, Any] = {}
        if target in ("response", "all"):
            cleared["response"] = {"entries": self._cache.clear()}
            await self._cache.flush()
        if target in ("prefix", "all"):
            tiers = []
            for slot in self._registry.configured():
                # A remote tier's prefix caches are its upstreams' own.
                if FAMILIES[slot.family_key] is GENERATION and slot.state is TierState.LOADED and not slot.remote:
                    await GENERATION.on_model_thread(slot, lambda engine: engine.reset_prefix_cache())
                    tiers.append(slot.name)
            cleared["prefix"] = {"tiers": tiers}
        return {"cleared": cleared}
