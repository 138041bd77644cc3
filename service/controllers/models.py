from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from litestar import Controller, Response, get

from service.registry import Registry, TierSlot, TierState
from service.schemas.models import ModelCard, ModelList


def model_card(registry: Registry, slot: TierSlot) -> ModelCard:
    return ModelCard(
        id=slot.id,
        created=int(slot.loaded_at or registry.started),
        owned_by=f"llmservice-{slot.name}",
        tier=slot.name,
        status=slot.state.value,
        engine=slot.engine_name,
        device=slot.device,
        context_length=slot.context_length or slot.settings.n_ctx,
        error=slot.error,
    )


class ModelsController(Controller):
    path = "/v1/models"

    @get()
    async def list_models(self, registry: Registry) -> ModelList:
        return ModelList([model_card(registry, s) for s in registry.configured()])

    @get("/{model_id:path}")
    async def get_model(self, model_id: str, registry: Registry) -> ModelCard:
        return model_card(registry, registry.resolve(model_id.lstrip("/")))


@get("/health", sync_to_thread=False)
def health(registry: Registry) -> Response[dict[str, Any]]:
    tiers = registry.health()
    serving = any(t["state"] in (TierState.LOADED, TierState.AVAILABLE, TierState.LOADING) for t in tiers.values())
    body = {
        "status": "healthy" if serving else "unhealthy",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "uptime_seconds": round(registry.uptime(), 1),
        "tiers": tiers,
    }
    return Response(body, status_code=200 if serving else 503)
