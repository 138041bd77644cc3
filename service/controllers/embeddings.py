from __future__ import annotations

from litestar import Controller, post

from service.metrics import RequestRecord
from service.schemas.embeddings import EmbeddingCreate, EmbeddingList
from service.serving.embeddings import Embeddings


class EmbeddingsController(Controller):
    path = "/v1/embeddings"

    @post(status_code=200, summary="Create embeddings")
    async def create(self, data: EmbeddingCreate, embeddings: Embeddings, record: RequestRecord) -> EmbeddingList:
        return await embeddings.create(data, record)
