"""A reranker with no weights, for testing the app in-process (see backends/fake.py). Never
chosen by settings. A document's raw score is the share of the query's words it contains, as a
logit: documents with more of the query's words rank higher."""

from __future__ import annotations

import math
from collections.abc import Callable

from embedders.base import Embedder
from kernel.config import TierSettings
from rerankers.base import Reranker, RerankerInfo


class FakeReranker(Reranker):
    name = "fake"

    def __init__(self, tier: TierSettings, model_path: str, embedder: Callable[[], Embedder] | None = None) -> None:
        self.tier = tier
        self.model_path = model_path

    def load(self) -> None:
        pass

    def info(self) -> RerankerInfo:
        return RerankerInfo("fake", 128, "logit")

    def score(self, query: str, docs: list[str]) -> list[float]:
        wanted = set(query.lower().split())
        shares = [len(wanted & set(doc.lower().split())) / max(len(wanted), 1) for doc in docs]
        return [math.log((s + 0.01) / (1.01 - s)) for s in shares]  # the share as a logit

    def count_tokens(self, query: str, docs: list[str]) -> int:
        return sum(len(query.split()) + len(doc.split()) for doc in docs)
