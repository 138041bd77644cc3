"""Rerank serving (Cohere, Jina and TEI shapes): between the `/v1/rerank` controller and the registry."""

from __future__ import annotations

from typing import Any

from kernel.errors import InvalidRequestError
from service.ids import new_id
from service.metrics import RequestRecord
from service.schemas.rerank import (
    CohereDocument,
    CohereResult,
    RerankMeta,
    RerankRequest,
    RerankResponse,
    RerankUsage,
    SeedResult,
    TeiResult,
)
from service.security import check_batch_size
from service.serving.dispatch import Dispatcher
from service.serving.input_limits import clip_texts
from service.tiers.families import RERANK
from service.tiers.registry import Registry
from service.tiers.slots import TierSlot


async def serve_rerank(
    data: RerankRequest, registry: Registry, dispatch: Dispatcher, record: RequestRecord
) -> RerankResponse | list[TeiResult]:
    """Sorted by relevance, best first; every document unless `top_n`/`top_k` asks for fewer."""
    if data.documents is None and data.texts is None:
        raise InvalidRequestError("documents is required", param="documents")
    docs = data.texts if data.documents is None else [d if isinstance(d, str) else d.text for d in data.documents]
    assert docs is not None
    check_batch_size(len(docs), registry.settings, param="documents")
    slot = await registry.tier_for(data.model, "reranker", data.adapter)
    answer: Any = RerankResponse | list[TeiResult]  # the type a cached answer decodes to
    result: RerankResponse | list[TeiResult] = await dispatch.cached(
        "rerank", slot, data, answer, record, lambda: _rerank(registry, slot, data, docs, record)
    )
    return result


async def _rerank(
    registry: Registry, slot: TierSlot, data: RerankRequest, docs: list[str], record: RequestRecord
) -> RerankResponse | list[TeiResult]:
    top = data.top_n if data.top_n is not None else data.top_k
    # The model truncates each pair anyway: cut first, so tokenising a huge document cannot hold the tier.
    query, *texts = clip_texts([data.query, *docs], slot.context_length or slot.settings.n_ctx)
    results, tokens = await RERANK.rerank(slot, query, texts, top, normalize=not data.raw_scores)
    record.prompt_tokens, record.generated = tokens, True
    if data.documents is None:  # TEI's /rerank body (`texts`) gets TEI's answer
        return [TeiResult(r.index, r.score, docs[r.index] if data.return_text else None) for r in results]
    keep = data.return_documents
    return RerankResponse(
        id=new_id("rerank-"),
        model=data.model,
        data=[SeedResult(r.index, r.score, docs[r.index] if keep else None) for r in results],
        results=[CohereResult(r.index, r.score, CohereDocument(docs[r.index]) if keep else None) for r in results],
        usage=RerankUsage(tokens, tokens),
        meta=RerankMeta({"search_units": 1, "input_tokens": tokens}),
    )
