"""Wire types of /v1/collections: collections, documents, retrieval, and the RAG chat completion."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from service.schemas.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest

# Metadata is flat so every value can be filtered on; keys are plain words so they cannot address
# into the store's payload paths (`a.b`, `a[]`).
MetaKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_]+$")]
MetaValue = Annotated[str, msgspec.Meta(max_length=1000)] | int | float | bool | None
Metadata = Annotated[dict[MetaKey, MetaValue], msgspec.Meta(max_length=32)]
DocumentId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
TopK = Annotated[int, msgspec.Meta(ge=1, le=100)]


class CollectionCreate(msgspec.Struct, kw_only=True):
    name: str  # checked by stores.base.check_collection_name, which says what is allowed
    model: str = "embedding"  # the embedding tier (or its model's name) that embeds this collection
    hybrid: bool | None = None  # dense + sparse; None = when the embedding model has sparse (BGE-M3)
    chunk_size: Annotated[int, msgspec.Meta(ge=100, le=8000)] | None = None  # default CHUNK_SIZE
    chunk_overlap: Annotated[int, msgspec.Meta(ge=0, le=4000)] | None = None  # default CHUNK_OVERLAP
    metadata: Metadata | None = None


class Collection(msgspec.Struct, kw_only=True):
    id: str
    created_at: int
    model: str
    dimension: int
    hybrid: bool
    chunk_size: int
    chunk_overlap: int
    chunks: int
    metadata: dict[str, MetaValue]
    object: Literal["collection"] = "collection"


class CollectionList(msgspec.Struct):
    data: list[Collection]
    object: Literal["list"] = "list"


class Deleted(msgspec.Struct, kw_only=True):
    id: str
    object: str
    deleted: bool = True
    chunks: int | None = None


class DocumentInput(msgspec.Struct, kw_only=True):
    text: Annotated[str, msgspec.Meta(min_length=1)]  # bounded by MAX_DOCUMENT_CHARS
    id: DocumentId | None = None  # an existing id is replaced; None = a new id
    metadata: Metadata | None = None


class DocumentsAdd(msgspec.Struct, kw_only=True):
    documents: Annotated[list[DocumentInput], msgspec.Meta(min_length=1)]  # bounded by MAX_BATCH_INPUTS


class Document(msgspec.Struct, kw_only=True):
    id: str
    created_at: int
    chunks: int
    characters: int
    metadata: dict[str, MetaValue]
    object: Literal["collection.document"] = "collection.document"


class Usage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class DocumentsAdded(msgspec.Struct):
    data: list[Document]
    usage: Usage
    object: Literal["list"] = "list"


class DocumentList(msgspec.Struct):
    data: list[Document]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: Literal["list"] = "list"


class Retrieval(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Our own object, so an unknown key is a mistake (`topk`): a 400 naming the known one."""

    top_k: TopK = 5
    rerank: bool | None = None  # None = when a reranker tier is configured
    filter: Annotated[dict[MetaKey, MetaValue], msgspec.Meta(max_length=32)] | None = None  # metadata equals


class QueryRequest(Retrieval, kw_only=True):
    query: Annotated[str, msgspec.Meta(min_length=1)]


class Source(msgspec.Struct, kw_only=True):
    id: str  # the chunk's id
    citation: int  # 1, 2, ...: the number the grounded prompt gives this passage (`[1]`)
    document_id: str
    chunk_index: int
    text: str
    metadata: dict[str, MetaValue]
    score: float  # the reranker's score when reranked, else the search score
    search_score: float  # cosine similarity, or the reciprocal-rank fusion score of hybrid search
    object: Literal["collection.chunk"] = "collection.chunk"


class Timings(msgspec.Struct):
    embed_ms: float
    search_ms: float
    rerank_ms: float


class QueryResponse(msgspec.Struct, kw_only=True):
    data: list[Source]
    model: str
    hybrid: bool
    reranked: bool
    rerank_skipped: str | None = None  # why a reranker was not run where it could not change the order
    documents_retrieved: int
    retrieval_time_ms: float
    timings: Timings
    usage: Usage
    object: Literal["list"] = "list"


class RagChatRequest(ChatCompletionRequest, kw_only=True):
    """A chat completion request; `rag` tunes retrieval (its `top_k` is not the sampling `top_k`)."""

    rag: Retrieval | None = None


class RagInfo(msgspec.Struct, kw_only=True):
    sources: list[Source]
    documents_retrieved: int
    retrieval_time_ms: float
    reranked: bool


class RagChatCompletion(ChatCompletion, kw_only=True):
    sources: list[Source]
    documents_retrieved: int
    retrieval_time_ms: float
    reranked: bool
    rerank_skipped: str | None = None


class RagChatCompletionChunk(ChatCompletionChunk, kw_only=True):
    """The first event of a RAG stream: a chat chunk that also carries the sources."""

    sources: list[Source]
    documents_retrieved: int
    retrieval_time_ms: float
    reranked: bool
    rerank_skipped: str | None = None
