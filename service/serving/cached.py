"""Asking the response cache, for every family (generation when deterministic, embeddings, rerank).

Asked before the tier is loaded: a hit never loads a model, nor waits for one."""

from __future__ import annotations

from typing import Any, TypeVar

from service.cache import ResponseCache
from service.metrics import RequestRecord
from service.tiers.slots import TierSlot

T = TypeVar("T")


def lookup(
    cache: ResponseCache, kind: str, slot: TierSlot, payload: Any, type_: type[T], record: RequestRecord
) -> tuple[str | None, T | None]:
    """The key to store the answer under (None with the cache off) and the answer stored there, if
    any; `record` notes the tier and the hit or miss."""
    record.tier = slot.name
    key = cache.key(kind, slot, payload)
    hit = cache.get(key, type_)
    if key is not None:
        record.cache = "miss" if hit is None else "hit"
    return key, hit
