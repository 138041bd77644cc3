from __future__ import annotations

from litestar import post

from service.metrics import RequestRecord
from service.schemas.rerank import RerankRequest, RerankResponse, TeiResult
from service.serving.rerank import Rerank


@post(["/v1/rerank", "/rerank", "/v2/rerank"], status_code=200, summary="Rerank documents")
async def rerank(data: RerankRequest, reranker: Rerank, record: RequestRecord) -> RerankResponse | list[TeiResult]:
    """Sorted by relevance, best first; every document unless `top_n`/`top_k` asks for fewer."""
    return await reranker.create(data, record)
