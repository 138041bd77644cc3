"""`/v1/adapters`: the LoRA adapters of each generation tier; load and unload them (admin)."""

from __future__ import annotations

from litestar import Controller, get, post

from service.schemas.adapters import AdapterCard, AdapterList, AdapterLoadRequest, AdapterUnloadRequest
from service.serving.models import Models


class AdaptersController(Controller):
    path = "/v1/adapters"

    @get(summary="List LoRA adapters per generation tier")
    async def list_adapters(self, models: Models) -> AdapterList:
        return models.adapters()

    @post("/load", status_code=200, summary="Load a LoRA adapter (inside MODELS_DIR)", opt={"admin": True})
    async def load(self, data: AdapterLoadRequest, models: Models) -> AdapterCard:
        return await models.load_adapter(data)

    @post("/unload", status_code=200, summary="Unload a LoRA adapter", opt={"admin": True})
    async def unload(self, data: AdapterUnloadRequest, models: Models) -> AdapterCard:
        return await models.unload_adapter(data)
