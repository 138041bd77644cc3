"""Operator endpoints: `/v1/stats`, `/v1/cache/stats`, `/v1/cache/clear`, `/metrics`.

Model load/unload live with the other model routes in `controllers/models.py`."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from litestar import Controller, Response, get, post
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.cache import ResponseCache
from service.metrics import Telemetry
from service.tiers.families import FAMILIES, GENERATION
from service.tiers.registry import Registry
from service.tiers.slots import TierState

_OBSERVE_OFF = {"observe": False}  # polling these is monitoring, not traffic
# Litestar appends `; charset=utf-8` to text/ types itself: without this it would be there twice.
_METRICS_TYPE = "; ".join(p for p in CONTENT_TYPE_LATEST.split("; ") if not p.startswith("charset="))


class CacheClearRequest(msgspec.Struct, kw_only=True):
    target: Literal["response", "prefix", "all"]  # required: an empty POST must not wipe everything


class AdminController(Controller):
    @get("/v1/stats", summary="Server, tier and worker statistics", opt=_OBSERVE_OFF)
    async def stats(self, telemetry: Telemetry) -> dict[str, Any]:
        return telemetry.snapshot()

    @get("/v1/cache/stats", summary="Response and prefix cache statistics", opt=_OBSERVE_OFF)
    async def cache_stats(self, telemetry: Telemetry, cache: ResponseCache) -> dict[str, Any]:
        return {"response": cache.stats(), "prefix": telemetry.prefix_stats()}

    @post("/v1/cache/clear", status_code=200, summary="Clear caches", opt={"admin": True})
    async def cache_clear(self, cache: ResponseCache, registry: Registry, data: CacheClearRequest) -> dict[str, Any]:
        target = data.target
        cleared: dict[str, Any] = {}
        if target in ("response", "all"):
            cleared["response"] = {"entries": cache.clear()}
            await cache.flush()
        if target in ("prefix", "all"):
            tiers = []
            for slot in registry.configured():
                if FAMILIES[slot.name] is GENERATION and slot.state is TierState.LOADED:
                    await GENERATION.on_model_thread(slot, lambda engine: engine.reset_prefix_cache())
                    tiers.append(slot.name)
            cleared["prefix"] = {"tiers": tiers}
        return {"cleared": cleared}

    @get(
        "/metrics", summary="Prometheus metrics", opt={**_OBSERVE_OFF, "media_type": "text/plain"}, sync_to_thread=False
    )
    def metrics(self, telemetry: Telemetry) -> Response[bytes]:
        return Response(generate_latest(telemetry.prometheus), media_type=_METRICS_TYPE)
