"""Rerank with an embedding model (RERANKER_MODEL_PATH=tier:embedding): no second model in memory.

BGE-M3 scores a weighted mix of its three outputs (RERANKER_HYBRID_WEIGHTS=dense,sparse,colbert,
default 0.4,0.2,0.4 as the BGE-M3 authors suggest; a zero weight skips that output); any other
embedder scores by cosine. Query and documents go through one `embed` call. Scores are
similarities (`score_kind="similarity"`): `rerank()` clamps rather than sigmoids them.

The embedder also serves the embedding tier from its own worker thread: every call here holds
`embedder.lock` so the two never run on the model at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from embedders.base import Embedder, EmbeddingOutput
from kernel.errors import InvalidRequestError, ModelUnavailableError, engine_errors
from rerankers.base import Reranker, RerankerInfo

if TYPE_CHECKING:
    from kernel.config import TierSettings

EmbedderProvider = Callable[[], Embedder]


class EmbeddingReranker(Reranker):
    name = "embedding"

    def __init__(self, tier: TierSettings, embedder_provider: EmbedderProvider) -> None:
        self.tier = tier
        self._provider = embedder_provider
        self._weights = tier.hybrid_weights
        self._active = self._weights  # what load() settles on for the embedder it gets
        self._embedder: Embedder | None = None
        self._info: RerankerInfo | None = None

    def load(self) -> None:
        embedder = self._provider()
        info = embedder.info()  # raises ModelUnavailableError if the embedding tier is not loaded
        self._embedder = embedder
        weights = self._weights if {"sparse", "colbert"} <= info.capabilities else (1.0, 0.0, 0.0)
        self._active = weights
        self._info = RerankerInfo(
            engine=f"{self.name}:{info.engine}",
            max_tokens=info.max_tokens,
            score_kind="similarity",
            device=info.device,
            extras={"weights": {"dense": weights[0], "sparse": weights[1], "colbert": weights[2]}},
        )

    def info(self) -> RerankerInfo:
        if self._info is None:
            raise ModelUnavailableError("The reranker is not loaded")
        return self._info

    def _current(self) -> Embedder:
        if self._embedder is None:
            raise ModelUnavailableError("The reranker is not loaded")
        try:
            self._embedder.info()
        except ModelUnavailableError:
            self.load()  # the embedding tier was unloaded and reloaded: take the new instance
            assert self._embedder is not None
        return self._embedder

    def score(self, query: str, docs: list[str]) -> list[float]:
        self.info()
        if not docs:
            return []
        embedder = self._current()
        texts = [query, *docs]
        if not embedder.info().embeds_empty and any(not t for t in texts):
            raise InvalidRequestError("query and documents must not be empty for this model", param="documents")
        w_dense, w_sparse, w_colbert = self._active
        with embedder.lock, engine_errors(self.name):
            outs = embedder.embed(texts, dense=w_dense > 0, sparse=w_sparse > 0, colbert=w_colbert > 0)
        q, rest = outs[0], outs[1:]
        total = w_dense + w_sparse + w_colbert
        return [
            (w_dense * _dense_score(q, d) + w_sparse * _sparse_score(q, d) + w_colbert * _colbert_score(q, d)) / total
            for d in rest
        ]

    def count_tokens(self, query: str, docs: list[str]) -> int:
        embedder = self._current()
        limit = embedder.info().max_tokens
        with embedder.lock:
            return sum(min(n, limit) for n in embedder.count_tokens([query, *docs]))

    def close(self) -> None:
        # The embedder belongs to the embedding tier: it is closed there, not here.
        self._embedder = None
        self._info = None


def _dense_score(q: EmbeddingOutput, d: EmbeddingOutput) -> float:
    if q.dense is None or d.dense is None:
        return 0.0
    return float(np.dot(q.dense, d.dense))  # both unit vectors: cosine


def _sparse_score(q: EmbeddingOutput, d: EmbeddingOutput) -> float:
    if not q.sparse or not d.sparse:
        return 0.0
    return sum(w * d.sparse[t] for t, w in q.sparse.items() if t in d.sparse)


def _colbert_score(q: EmbeddingOutput, d: EmbeddingOutput) -> float:
    """Late interaction: each query token's best match in the document, averaged."""
    if q.colbert is None or d.colbert is None or not len(q.colbert) or not len(d.colbert):
        return 0.0
    sims = q.colbert @ d.colbert.T
    return float(sims.max(axis=1).mean())
