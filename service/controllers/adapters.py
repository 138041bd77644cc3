"""`/v1/adapters`: the LoRA adapters of each generation tier; load and unload them (admin)."""

from __future__ import annotations

import os

from litestar import Controller, get, post

from service.lifecycle import Lifecycle
from service.schemas.adapters import AdapterCard, AdapterList, AdapterLoadRequest, AdapterUnloadRequest
from service.settings import GENERATION_TIERS
from service.tiers.model_paths import disk_size
from service.tiers.registry import Registry
from service.tiers.slots import AdapterRecord, TierSlot


def adapter_card(slot: TierSlot, record: AdapterRecord) -> AdapterCard:
    size = record.size_bytes
    if size is None and os.path.exists(record.path):
        size = disk_size(record.path)
    return AdapterCard(
        id=record.name,
        model=slot.id,
        tier=slot.name,
        path=record.path,
        status=record.status,
        source=record.source,
        size_bytes=size,
        rank=record.rank,
        usage_count=record.requests,
        error=record.error,
    )


class AdaptersController(Controller):
    path = "/v1/adapters"

    @get(summary="List LoRA adapters per generation tier")
    async def list_adapters(self, registry: Registry) -> AdapterList:
        cards = [
            adapter_card(slot, record)
            for slot in registry.configured()
            if slot.name in GENERATION_TIERS
            for record in slot.adapters.values()
        ]
        return AdapterList(cards)

    @post("/load", status_code=200, summary="Load a LoRA adapter (inside MODELS_DIR)", opt={"admin": True})
    async def load(self, data: AdapterLoadRequest, lifecycle: Lifecycle) -> AdapterCard:
        slot, record = await lifecycle.load_adapter(data.model, data.adapter, data.path)
        return adapter_card(slot, record)

    @post("/unload", status_code=200, summary="Unload a LoRA adapter", opt={"admin": True})
    async def unload(self, data: AdapterUnloadRequest, lifecycle: Lifecycle) -> AdapterCard:
        slot, record = await lifecycle.unload_adapter(data.model, data.adapter)
        return adapter_card(slot, record)
