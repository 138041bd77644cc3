"""The reranker contract: one neutral result type, one small ABC, and `rerank()` built on `score()`.

Score kinds, declared by each engine in `RerankerInfo.score_kind`:
- "logit" (cross-encoders, bge-reranker): unbounded; `normalize=True` maps it to 0..1 with a sigmoid.
- "similarity" (cosine, or BGE-M3's weighted mix of cosine-like scores): already about -1..1 and
  meaningful as is, so it is *not* passed through a sigmoid (that would squash every score into
  0.27..0.73); `normalize=True` only clamps it into 0..1, as relevance_score promises.
Ordering always follows the raw score, so clamping never reorders results.

With a micro-batcher, pairs from several requests go through `score_pairs` in one call and each
request orders its own slice with `rank`; without one, `rerank` does both. A `PairTokenizing`
reranker's pairs are tokenised on the request side instead, once (for packing, usage and the
forward pass), and the batcher runs `score_tokens` on them.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kernel.errors import EngineError, InvalidRequestError

ScoreKind = Literal["logit", "similarity"]


@dataclass(frozen=True, slots=True)
class RerankResult:
    index: int  # position of the document in the request
    score: float  # 0..1 when normalised, else equal to raw_score
    raw_score: float


@dataclass(frozen=True, slots=True)
class RerankerInfo:
    engine: str
    max_tokens: int  # a (query, document) pair longer than this is truncated
    score_kind: ScoreKind
    device: str = "cpu"
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PairTokens:
    """A (query, document) pair as the model sees it: special tokens added, truncated."""

    ids: list[int]
    type_ids: list[int]  # which segment each token belongs to (BERT's token_type_ids)


class Reranker(abc.ABC):
    """A loaded reranker. Not thread-safe: call it from one worker thread."""

    name: str = "reranker"

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights; raise `ModelUnavailableError` with a clear message on failure."""

    @abc.abstractmethod
    def info(self) -> RerankerInfo: ...

    @abc.abstractmethod
    def score(self, query: str, docs: list[str]) -> list[float]:
        """Raw relevance of each document to the query (logits or similarities), batched."""

    @abc.abstractmethod
    def count_tokens(self, query: str, docs: list[str]) -> int:
        """Tokens the request costs (for usage), after truncation."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model's memory."""

    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Raw scores for (query, document) pairs that may come from several requests: the
        micro-batcher's `run_batch`. Default: one `score()` per run of pairs sharing a query;
        cross-encoders override it to score every pair in one pass."""
        scores: list[float] = []
        start = 0
        while start < len(pairs):
            query = pairs[start][0]
            stop = start + 1
            while stop < len(pairs) and pairs[stop][0] == query:
                stop += 1
            scores.extend(self.score(query, [doc for _, doc in pairs[start:stop]]))
            start = stop
        return scores

    def rerank(
        self, query: str, docs: list[str], top_n: int | None = None, normalize: bool = True
    ) -> list[RerankResult]:
        """Documents sorted by relevance, best first; the `top_n` best when given."""
        check_top_n(top_n)
        if not docs:
            return []
        raw = self.score(query, docs)
        if len(raw) != len(docs):
            raise EngineError(f"{self.name} returned {len(raw)} scores for {len(docs)} documents")
        return self.rank(raw, top_n, normalize)

    def rank(self, raw: list[float], top_n: int | None = None, normalize: bool = True) -> list[RerankResult]:
        """Order raw scores (from `score` or `score_pairs`) into results."""
        check_top_n(top_n)
        kind = self.info().score_kind
        # Stable sort on the raw score: equal scores keep request order.
        order = sorted(range(len(raw)), key=lambda i: -raw[i])
        if top_n is not None:
            order = order[:top_n]
        return [
            RerankResult(index=i, score=normalize_score(raw[i], kind) if normalize else raw[i], raw_score=raw[i])
            for i in order
        ]


class PairTokenizing(abc.ABC):
    """A reranker whose tokenizer may run on request threads, beside the model's forward pass (as
    `embedders.base.PreTokenizing`): `tokenize_pairs` is thread-safe and never touches a tokenizer
    the model thread uses."""

    @property
    def pretokenizes(self) -> bool:
        """False where this loaded model must tokenise on its own thread after all (a slow tokenizer)."""
        return True

    @abc.abstractmethod
    def tokenize_pairs(self, query: str, docs: list[str]) -> list[PairTokens]: ...

    @abc.abstractmethod
    def score_tokens(self, pairs: list[PairTokens]) -> list[float]:
        """Raw scores for pairs from `tokenize_pairs`, possibly of several requests."""


def encode_pairs(backend: Any, pairs: Sequence[tuple[str, str]]) -> list[PairTokens]:
    """Pairs through a fast tokenizer's Rust backend (`embedders.base.request_tokenizer`: it
    truncates longest-first, as the model's own tokenizer does for pairs, and never pads)."""
    return [PairTokens(e.ids, e.type_ids) for e in backend.encode_batch(list(pairs))]


def check_top_n(top_n: int | None) -> None:
    if top_n is not None and top_n < 1:
        raise InvalidRequestError(f"top_n must be at least 1, got {top_n}", param="top_n")


def normalize_score(raw: float, kind: ScoreKind) -> float:
    if kind == "similarity":
        return min(1.0, max(0.0, raw))
    return sigmoid(raw)


def sigmoid(x: float) -> float:
    # Split by sign so neither branch overflows math.exp for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
