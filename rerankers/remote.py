"""A reranker tier served by upstreams (`RERANKER_BACKEND=remote`): their `/rerank` answer (the
Cohere/Jina shape of vLLM, infinity and llmservice, or TEI's list) as our results, best first."""

from __future__ import annotations

from typing import Any

from kernel.errors import UpstreamError
from rerankers.base import RerankResult, check_top_n


def rerank_body(query: str, docs: list[str]) -> dict[str, Any]:
    """Every document scored (`top_n` is cut here); `texts` for TEI, `documents` for the others."""
    return {"query": query, "documents": docs, "texts": docs, "return_documents": False}


def rerank_results(answer: Any, count: int, top_n: int | None) -> tuple[list[RerankResult], int]:
    """The upstream's scores as results, best first (stable), and the tokens it reports (0: none)."""
    check_top_n(top_n)
    try:
        rows = answer if isinstance(answer, list) else answer["results"]
        scores = {int(r["index"]): float(r["relevance_score"] if "relevance_score" in r else r["score"]) for r in rows}
        usage = answer.get("usage") if isinstance(answer, dict) else None
        tokens = int((usage or {}).get("total_tokens") or (usage or {}).get("prompt_tokens") or 0)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UpstreamError("The upstream's rerank answer is neither the Cohere nor the TEI shape") from None
    if sorted(scores) != list(range(count)):
        raise UpstreamError(f"The upstream scored {len(scores)} of {count} documents")
    order = sorted(range(count), key=lambda i: -scores[i])[:top_n]
    return [RerankResult(index=i, score=scores[i], raw_score=scores[i]) for i in order], tokens
