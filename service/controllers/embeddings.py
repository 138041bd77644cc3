from __future__ import annotations

from litestar import Controller, post

from service.dispatch import Dispatcher
from service.embeddings import serve_embeddings
from service.metrics import RequestRecord
from service.registry import Registry
from service.schemas.embeddings import EmbeddingCreate, EmbeddingList


class EmbeddingsController(Controller):
    path = "/v1/embeddings"

    @post(status_code=200, summary="Create embeddings")
    async def create(
        self, data: EmbeddingCreate, registry: Registry, dispatch: Dispatcher, record: RequestRecord
    ) -> EmbeddingList:
        return await serve_embeddings(data, registry, dispatch, record)
