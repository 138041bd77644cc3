"""The response cache for deterministic endpoints that answer whole (embeddings, rerank). Generation
asks the cache in its own request skeleton (service.serving.generation)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from service.cache import ResponseCache
from service.metrics import RequestRecord
from service.tiers.slots import TierSlot

T = TypeVar("T")


class Dispatcher:
    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    async def cached(
        self,
        kind: str,
        slot: TierSlot,
        payload: Any,
        type_: type[T],
        record: RequestRecord,
        compute: Callable[[], Awaitable[T]],
    ) -> T:
        """For deterministic endpoints (embeddings, rerank): `compute()`'s result, from the cache when
        an identical `payload` (any msgspec-encodable request) was answered before."""
        record.tier = slot.name
        key = self.cache.key(kind, slot, payload)
        hit = self.cache.get(key, type_)
        if key is not None:
            record.cache = "miss" if hit is None else "hit"
        if hit is not None:
            return hit
        value = await compute()
        self.cache.put(key, value)
        return value
