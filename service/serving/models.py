"""What the server serves, as `/v1/models`, `/v1/adapters` and `/health` show it, and loading or
unloading on an admin's request (service.lifecycle does the work)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from service.lifecycle import Lifecycle
from service.schemas.adapters import AdapterCard, AdapterList, AdapterLoadRequest, AdapterUnloadRequest
from service.schemas.models import CatalogueInfo, ModelCard, ModelList
from service.settings import GENERATION_TIERS
from service.tiers.catalogue import CatalogueEntry
from service.tiers.model_paths import disk_size
from service.tiers.registry import Registry
from service.tiers.slots import AdapterRecord, TierSlot, TierState, TierView


class Models:
    def __init__(self, registry: Registry, lifecycle: Lifecycle) -> None:
        self._registry = registry
        self._lifecycle = lifecycle

    # -- models ------------------------------------------------------------------------------
    def all(self) -> ModelList:
        """The tiers and every model in MODELS_DIR: those a tier serves or that were used as their
        slots show them (with `catalogue`), the others `available` (a request naming one loads it)."""
        slots = self._registry.configured()
        cards = [self._card(s) for s in slots]
        held = {s.name for s in slots} | {e.id for s in slots if (e := self._registry.catalogue_entry(s))}
        entries = self._registry.catalogue.entries().values()
        return ModelList(cards + [self._entry_card(e) for e in entries if e.id not in held])

    def _entry_card(self, entry: CatalogueEntry) -> ModelCard:
        return ModelCard(
            id=entry.id,
            created=int(self._registry.started),
            owned_by="llmservice-catalogue",
            tier=entry.id,
            status=TierState.AVAILABLE.value,
            context_length=entry.context_length,
            size_bytes=entry.size_bytes,
            catalogue=_catalogue_info(entry),
        )

    def get(self, model_id: str) -> ModelCard:
        slot = self._registry.resolve(model_id)
        return self._card(slot, _details(slot))

    async def load(self, model_id: str, model_path: str | None) -> ModelCard:
        slot, replaced = await self._lifecycle.load(model_id, model_path)
        details = _details(slot)
        if replaced is not None:
            details["replaced"] = replaced
        return self._card(slot, details)

    async def unload(self, model_id: str) -> ModelCard:
        slot, waited = await self._lifecycle.unload(model_id)
        return self._card(slot, {**_details(slot), "waited_for_requests": waited})

    def health(self) -> dict[str, Any]:
        """`status` is `unhealthy` when no tier can serve (loaded, loadable or loading)."""
        tiers = {v.tier: _health(v) for v in (slot.view() for slot in self._registry.configured())}
        serving = any(t["state"] in (TierState.LOADED, TierState.AVAILABLE, TierState.LOADING) for t in tiers.values())
        return {
            "status": "healthy" if serving else "unhealthy",
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
            "uptime_seconds": round(self._registry.uptime(), 1),
            "tiers": tiers,
            "memory": self._registry.budget.view(),
        }

    def _card(self, slot: TierSlot, details: dict[str, Any] | None = None) -> ModelCard:
        registry, v = self._registry, slot.view()
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
            capabilities=["vision"] if slot.settings.reads_images else None,
            upstreams=_upstreams(v),
            catalogue=_catalogue_info(entry) if (entry := self._registry.catalogue_entry(slot)) else None,
            details=details,
        )

    # -- LoRA adapters -----------------------------------------------------------------------
    def adapters(self) -> AdapterList:
        slots = [slot for slot in self._registry.configured() if slot.name in GENERATION_TIERS]
        return AdapterList([_adapter_card(slot, record) for slot in slots for record in slot.adapters.values()])

    async def load_adapter(self, data: AdapterLoadRequest) -> AdapterCard:
        return _adapter_card(*await self._lifecycle.load_adapter(data.model, data.adapter, data.path))

    async def unload_adapter(self, data: AdapterUnloadRequest) -> AdapterCard:
        return _adapter_card(*await self._lifecycle.unload_adapter(data.model, data.adapter))


def _catalogue_info(entry: CatalogueEntry) -> CatalogueInfo:
    return CatalogueInfo(
        kind=entry.kind,
        format=entry.format,
        quantisation=entry.quantisation,
        architecture=entry.architecture,
        capabilities=list(entry.capabilities) or None,
        projector=True if entry.projector else None,
    )


def _details(slot: TierSlot) -> dict[str, Any]:
    t = slot.settings
    details = {
        "backend": t.backend,
        "path": slot.path or t.model_path,
        "n_ctx": t.n_ctx,
        "max_queue": t.max_queue,
        "preload": t.preload,
        "load_seconds": round(slot.load_seconds, 3) if slot.load_seconds is not None else None,
        "worker": slot.view().worker,
    }
    if slot.name in GENERATION_TIERS:
        details["sampling"] = _sampling(slot)
    return details


def _sampling(slot: TierSlot) -> dict[str, dict[str, Any]] | None:
    """What a request that sets no sampling field gets, and from where (settings, model card,
    built-in); None until a load has read the model card."""
    if slot.card is None:
        return None
    values, sources = slot.sampling()
    return {name: {"value": getattr(values, name), "source": source} for name, source in sources.items()}


def _upstreams(v: TierView) -> list[dict[str, Any]] | None:
    """A remote tier's upstreams as its pool sees them (None for a local tier)."""
    return v.worker.get("upstreams") if v.worker is not None else None


def _health(v: TierView) -> dict[str, Any]:
    upstreams = _upstreams(v)
    return {
        **({"upstreams": upstreams} if upstreams is not None else {}),
        "state": v.state,
        "model": v.model,
        "engine": v.engine,
        "device": v.device,
        "context_length": v.context_length,
        "kv_bytes": v.kv_bytes,
        "error": v.error,
        "queued": v.queued,
        "busy": v.busy,
    }


def _adapter_card(slot: TierSlot, record: AdapterRecord) -> AdapterCard:
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
