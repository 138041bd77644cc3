from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Count = Annotated[int, msgspec.Meta(ge=1)]


class DocumentObject(msgspec.Struct, kw_only=True):
    text: str


class RerankRequest(msgspec.Struct, kw_only=True):
    """The seed's shape, Cohere/Jina (`top_n`, documents as objects) and TEI (`texts`) in one."""

    query: str
    model: str = "reranker"
    documents: list[str | DocumentObject] | None = None
    texts: list[str] | None = None  # TEI
    top_k: Count | None = None
    top_n: Count | None = None
    return_documents: bool = True
    return_text: bool = False  # TEI
    raw_scores: bool = False
    adapter: str | None = None  # refused when set: a reranker takes no LoRA adapter


class SeedResult(msgspec.Struct):
    index: int
    score: float
    document: str | None = None


class CohereDocument(msgspec.Struct):
    text: str


class CohereResult(msgspec.Struct, omit_defaults=True):
    index: int
    relevance_score: float
    document: CohereDocument | None = None


class RerankUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class RerankMeta(msgspec.Struct):
    billed_units: dict[str, int]


class RerankResponse(msgspec.Struct):
    id: str
    model: str
    data: list[SeedResult]
    results: list[CohereResult]
    usage: RerankUsage
    meta: RerankMeta
    object: Literal["list"] = "list"


class TeiResult(msgspec.Struct, omit_defaults=True):
    index: int
    score: float
    text: str | None = None
