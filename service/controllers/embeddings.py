from __future__ import annotations

from litestar import Controller, post

from service.metrics import RequestRecord
from service.schemas.embeddings import EmbeddingCreate, EmbeddingList
from service.serving.dispatch import Dispatcher
from service.serving.embeddings import serve_embeddings
from service.tiers.registry import Registry


class EmbeddingsController(Controller):
    path = "/v1/embeddings"

    @post(status_code=200, summary="Create embeddings")
    async def create(
        self, data: EmbeddingCreate, registry: Registry, dispatch: Dispatcher, record: RequestRecord
    ) -> EmbeddingList:
        return await serve_embeddings(data, registry, dispatch, record)
