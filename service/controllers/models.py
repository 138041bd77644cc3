from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from litestar import Controller, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.openapi import ResponseSpec

from service.lifecycle import Lifecycle
from service.schemas.models import LoadRequest, ModelCard, ModelList
from service.tiers.model_paths import disk_size
from service.tiers.registry import Registry
from service.tiers.slots import TierSlot, TierState, TierView


def model_card(registry: Registry, slot: TierSlot, details: dict[str, Any] | None = None) -> ModelCard:
    v = slot.view()
    size = slot.size_bytes
    if size is None and slot.settings.model_path and ":" not in slot.settings.model_path:
        size = disk_size(os.path.expanduser(slot.settings.model_path))
    return ModelCard(
        id=v.model,
        created=int(slot.loaded_at or registry.started),
        owned_by=f"llmservice-{v.tier}",
        tier=v.tier,
        status=v.state,
        engine=v.engine,
        device=v.device,
        context_length=v.context_length,
        dimension=v.dimension,
        error=v.error,
        size_bytes=size,
        loaded_at=int(v.loaded_at) if v.loaded_at else None,
        last_used=int(v.last_used) if v.last_used else None,
        usage_count=v.requests,
        in_flight=v.in_flight,
        keep_alive=slot.settings.keep_alive,
        pinned=slot.settings.pin,
        aliases=[pattern for pattern, tier in registry.aliases if tier == slot.name] or None,
        details=details,
    )


def model_details(slot: TierSlot) -> dict[str, Any]:
    t = slot.settings
    return {
        "backend": t.backend,
        "path": slot.path or t.model_path,
        "n_ctx": t.n_ctx,
        "max_queue": t.max_queue,
        "preload": t.preload,
        "load_seconds": round(slot.load_seconds, 3) if slot.load_seconds is not None else None,
        "worker": slot.view().worker,
    }


class ModelsController(Controller):
    path = "/v1/models"

    @get(summary="List models")
    async def list_models(self, registry: Registry) -> ModelList:
        return ModelList([model_card(registry, s) for s in registry.configured()])

    @get("/{model_id:path}", summary="Retrieve a model")
    async def get_model(self, model_id: str, registry: Registry) -> ModelCard:
        slot = registry.resolve(model_id.lstrip("/"))
        return model_card(registry, slot, model_details(slot))

    # `{id}/load` and `{id}/unload` share the path parameter: ids contain slashes (`light/gemma-3-270m`).
    @post("/{model_id:path}", status_code=200, opt={"admin": True, "actions": {"load": True, "unload": False}})
    async def model_action(
        self, model_id: str, registry: Registry, lifecycle: Lifecycle, data: LoadRequest | None = None
    ) -> ModelCard:
        target, _, action = model_id.strip("/").rpartition("/")
        if action == "load" and target:
            slot, replaced = await lifecycle.load(target, data.model_path if data else None)
            details = model_details(slot)
            if replaced is not None:
                details["replaced"] = replaced
            return model_card(registry, slot, details)
        if action == "unload" and target:
            slot, waited = await lifecycle.unload(target)
            return model_card(registry, slot, {**model_details(slot), "waited_for_requests": waited})
        raise NotFoundException()


@get(
    "/health",
    summary="Health of the server and each tier",
    sync_to_thread=False,
    opt={"public": True, "observe": False},
    responses={
        503: ResponseSpec(
            dict[str, Any], generate_examples=False, description="No tier can serve: the same body, `unhealthy`"
        )
    },
)
def health(registry: Registry) -> Response[dict[str, Any]]:
    tiers = {v.tier: _health(v) for v in (slot.view() for slot in registry.configured())}
    serving = any(t["state"] in (TierState.LOADED, TierState.AVAILABLE, TierState.LOADING) for t in tiers.values())
    body = {
        "status": "healthy" if serving else "unhealthy",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "uptime_seconds": round(registry.uptime(), 1),
        "tiers": tiers,
    }
    return Response(body, status_code=200 if serving else 503)


def _health(v: TierView) -> dict[str, Any]:
    return {
        "state": v.state,
        "model": v.model,
        "engine": v.engine,
        "device": v.device,
        "context_length": v.context_length,
        "error": v.error,
        "queued": v.queued,
        "busy": v.busy,
    }
