"""Rerank serving (Cohere, Jina and TEI shapes): between the `/v1/rerank` controller and the registry."""

from __future__ import annotations

from typing import Any

from kernel.errors import InvalidRequestError
from rerankers.base import RerankResult
from service.cache import ResponseCache
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
from service.serving.cached import lookup
from service.serving.input_limits import clip_texts
from service.tiers.families import RERANK
from service.tiers.registry import Registry
from service.tiers.slots import TierSlot

_ANSWER: Any = RerankResponse | list[TeiResult]  # the type a cached answer decodes to


class Rerank:
    """The reranker tier's way in, for `/v1/rerank` and collections."""

    def __init__(self, registry: Registry, cache: ResponseCache) -> None:
        self._registry = registry
        self._cache = cache

    async def create(self, data: RerankRequest, record: RequestRecord) -> RerankResponse | list[TeiResult]:
        """Sorted by relevance, best first; every document unless `top_n`/`top_k` asks for fewer."""
        if data.documents is None and data.texts is None:
            raise InvalidRequestError("documents is required", param="documents")
        docs = data.texts if data.documents is None else [d if isinstance(d, str) else d.text for d in data.documents]
        assert docs is not None
        check_batch_size(len(docs), self._registry.settings, param="documents")
        slot = self._registry.tier_slot(data.model, "reranker", data.adapter)
        key, hit = lookup(self._cache, "rerank", slot, data, _ANSWER, record)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        await self._registry.ensure_loaded(slot)
        top = data.top_n if data.top_n is not None else data.top_k
        results, tokens = await self.scores(slot, data.query, docs, top, normalize=not data.raw_scores)
        record.prompt_tokens, record.generated = tokens, True
        answer = _answer(data, docs, results, tokens)
        self._cache.put(key, answer)
        return answer

    @staticmethod
    async def scores(
        slot: TierSlot, query: str, docs: list[str], top: int | None, *, normalize: bool
    ) -> tuple[list[RerankResult], int]:
        """`docs` scored against `query` on the loaded `slot`, best first, and the tokens that took."""
        # The model truncates each pair anyway: cut first, so tokenising a huge document cannot hold the tier.
        query, *texts = clip_texts([query, *docs], slot.context_length or slot.settings.n_ctx)
        return await RERANK.rerank(slot, query, texts, top, normalize=normalize)


def _answer(
    data: RerankRequest, docs: list[str], results: list[RerankResult], tokens: int
) -> RerankResponse | list[TeiResult]:
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
