"""Operator endpoints: `/v1/stats`, `/v1/cache/stats`, `/v1/cache/clear`, `/metrics`.

Model load/unload live with the other model routes in `controllers/models.py`."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get, post
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.metrics import Telemetry
from service.schemas.admin import CacheClearRequest
from service.serving.caches import Caches

_OBSERVE_OFF = {"observe": False}  # polling these is monitoring, not traffic
# Litestar appends `; charset=utf-8` to text/ types itself: without this it would be there twice.
_METRICS_TYPE = "; ".join(p for p in CONTENT_TYPE_LATEST.split("; ") if not p.startswith("charset="))


class AdminController(Controller):
    @get("/v1/stats", summary="Server, tier and worker statistics", opt=_OBSERVE_OFF)
    async def stats(self, telemetry: Telemetry) -> dict[str, Any]:
        return telemetry.snapshot()

    @get("/v1/cache/stats", summary="Response and prefix cache statistics", opt=_OBSERVE_OFF)
    async def cache_stats(self, caches: Caches) -> dict[str, Any]:
        return caches.stats()

    @post("/v1/cache/clear", status_code=200, summary="Clear caches", opt={"admin": True})
    async def cache_clear(self, caches: Caches, data: CacheClearRequest) -> dict[str, Any]:
        return await caches.clear(data.target)

    @get(
        "/metrics", summary="Prometheus metrics", opt={**_OBSERVE_OFF, "media_type": "text/plain"}, sync_to_thread=False
    )
    def metrics(self, telemetry: Telemetry) -> Response[bytes]:
        return Response(generate_latest(telemetry.prometheus), media_type=_METRICS_TYPE)
