"""RAG collections, between the /v1/collections controllers and the embedding and rerank serving
objects and vector store.

Adding documents chunks them (`service.jobs.chunking`), embeds the chunks on the embedding tier and
stores them. A query embeds the question on the same tier, takes the best chunks from the store
(hybrid dense + sparse when the collection was made with a BGE-M3 tier), then, when a reranker
tier is configured or the request asks, reorders a wider candidate set with it. A collection
remembers the embedding model and dimension it was built with: vectors of another model are not
comparable, so using it after the embedding tier changed is a 409, not silently wrong results.

The store is opened on first use and called from one worker thread: embedded Qdrant is not
thread-safe, and its calls (SQLite, numpy) stay off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kernel.errors import ConflictError, InvalidRequestError, NotFoundError
from service.ids import new_id
from service.jobs.chunking import chunk_text
from service.schemas.collections import (
    Collection,
    CollectionCreate,
    Document,
    DocumentsAdd,
    DocumentsAdded,
    QueryResponse,
    Retrieval,
    Source,
    Timings,
    Usage,
)
from service.security import check_batch_size
from service.serving.embeddings import Embeddings
from service.serving.rerank import Rerank
from service.settings import Settings
from service.tiers.registry import Registry
from service.tiers.slots import TierSlot, TierState
from stores.base import CollectionInfo, Hit, StoredChunk, VectorStore, check_collection_name
from stores.factory import create_store

T = TypeVar("T")
_MAX_CANDIDATES = 100  # chunks a reranker scores per query: 4 x top_k, at least 20


class Collections:
    def __init__(self, settings: Settings, registry: Registry, embeddings: Embeddings, rerank: Rerank) -> None:
        self._settings = settings
        self._registry = registry
        self._embeddings = embeddings
        self._rerank = rerank
        self._store: VectorStore | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="collections")

    def _open(self) -> VectorStore:  # on the store's thread
        if self._store is None:
            settings = self._settings
            self._store = create_store(
                path=settings.collections_dir, url=settings.collections_url, api_key=settings.collections_api_key
            )
        return self._store

    async def _run(self, call: Callable[[VectorStore], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: call(self._open()))

    async def close(self) -> None:
        def close() -> None:
            if self._store is not None:
                self._store.close()
                self._store = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown()

    # -- collections -----------------------------------------------------------------------
    async def create(self, data: CollectionCreate) -> Collection:
        name = check_collection_name(data.name)
        size = self._settings.chunk_size if data.chunk_size is None else data.chunk_size
        overlap = self._settings.chunk_overlap if data.chunk_overlap is None else data.chunk_overlap
        if overlap * 2 > size:
            raise InvalidRequestError(
                f"chunk_overlap must be at most chunk_size / 2 ({size // 2})", param="chunk_overlap"
            )
        slot = await self._registry.tier_for(data.model, "embedding")
        has_sparse = "sparse" in slot.capabilities
        if data.hybrid and not has_sparse:
            raise InvalidRequestError(
                f"hybrid search needs an embedding model with sparse vectors (BGE-M3); {slot.model} has none",
                param="hybrid",
            )
        assert slot.dimension is not None  # a loaded embedding tier knows it
        config: dict[str, Any] = {
            "tier": slot.name,
            "model": slot.model,
            "dimension": slot.dimension,
            "hybrid": has_sparse if data.hybrid is None else data.hybrid,
            "chunk_size": size,
            "chunk_overlap": overlap,
            "created_at": int(time.time()),
            "metadata": data.metadata or {},
        }
        hybrid = bool(config["hybrid"])
        await self._run(lambda s: s.create_collection(name, slot.dimension or 0, hybrid, config))
        return _collection(CollectionInfo(name, 0, config))

    async def get(self, name: str) -> Collection:
        return _collection(await self._info(name))

    async def all(self) -> list[Collection]:
        return [_collection(info) for info in await self._run(lambda s: s.collections())]

    async def delete(self, name: str) -> None:
        check_collection_name(name)
        await self._run(lambda s: s.drop_collection(name))

    async def _info(self, name: str) -> CollectionInfo:
        check_collection_name(name)
        return await self._run(lambda s: s.collection(name))

    async def _embedder(self, info: CollectionInfo) -> TierSlot:
        config = info.config
        slot = await self._registry.tier_for(str(config["tier"]), "embedding")
        if slot.model != config["model"] or slot.dimension != config["dimension"]:
            raise ConflictError(
                f"Collection {info.name} was embedded with {config['model']} ({config['dimension']} dimensions);"
                f" the {slot.name} tier now serves {slot.model} ({slot.dimension}). Serve that model again, or"
                " recreate the collection",
                code="embedding_model_mismatch",
            )
        return slot

    # -- documents -------------------------------------------------------------------------
    async def add(self, name: str, data: DocumentsAdd) -> DocumentsAdded:
        check_batch_size(len(data.documents), self._settings, param="documents")
        limit = self._settings.max_document_chars
        for i, doc in enumerate(data.documents):
            if len(doc.text) > limit:
                raise InvalidRequestError(
                    f"Document {i} has {len(doc.text)} characters; at most {limit} (MAX_DOCUMENT_CHARS)",
                    param=f"documents[{i}].text",
                )
        ids = [doc.id or new_id("doc-") for doc in data.documents]
        if len(set(ids)) != len(ids):
            raise InvalidRequestError("Document ids must be unique within a request", param="documents")
        info = await self._info(name)
        size, overlap = int(info.config["chunk_size"]), int(info.config["chunk_overlap"])
        texts = [doc.text for doc in data.documents]
        pieces = await asyncio.to_thread(lambda: [chunk_text(t, size, overlap) for t in texts])
        total = sum(len(p) for p in pieces)
        if total > self._settings.max_batch_inputs:
            raise InvalidRequestError(
                f"These documents make {total} chunks of {size} characters; at most {self._settings.max_batch_inputs}"
                " per request (MAX_BATCH_INPUTS): send fewer documents per request",
                param="documents",
            )
        for i, chunks in enumerate(pieces):
            if not chunks:
                raise InvalidRequestError(f"Document {i} has no text", param=f"documents[{i}].text")
        slot = await self._embedder(info)
        hybrid = bool(info.config["hybrid"])
        batch = await self._embeddings.embed(slot, [c for chunks in pieces for c in chunks], sparse=hybrid)
        created = int(time.time())
        stored: list[StoredChunk] = []
        added: list[Document] = []
        outputs = iter(batch.outputs)
        for doc, doc_id, chunks in zip(data.documents, ids, pieces, strict=True):
            payload: dict[str, Any] = {"created_at": created, "chunks": len(chunks), "characters": len(doc.text)}
            payload["metadata"] = doc.metadata or {}
            for index, text in enumerate(chunks):
                out = next(outputs)
                assert out.dense is not None
                sparse = {int(k): float(v) for k, v in out.sparse.items()} if hybrid and out.sparse else None
                stored.append(StoredChunk(doc_id, index, text, out.dense.tolist(), sparse, payload))
            added.append(Document(id=doc_id, created_at=created, chunks=len(chunks), characters=len(doc.text),
                                  metadata=doc.metadata or {}))  # fmt: skip
        await self._run(lambda s: s.replace_documents(name, stored))
        return DocumentsAdded(added, Usage(batch.prompt_tokens, batch.prompt_tokens))

    async def documents(self, name: str, limit: int, after: str | None) -> tuple[list[Document], bool]:
        check_collection_name(name)
        firsts, more = await self._run(lambda s: s.documents(name, limit, after))
        return [_document(hit) for hit in firsts], more

    async def delete_document(self, name: str, document_id: str) -> int:
        check_collection_name(name)
        removed = await self._run(lambda s: s.delete_document(name, document_id))
        if not removed:
            raise NotFoundError(
                f"Document not found in collection {name}: {document_id[:100]}",
                param="document_id",
                code="document_not_found",
            )
        return removed

    # -- retrieval -------------------------------------------------------------------------
    async def query(self, name: str, question: str, options: Retrieval) -> QueryResponse:
        started = time.perf_counter()
        info = await self._info(name)
        slot = await self._embedder(info)
        hybrid = bool(info.config["hybrid"])
        batch = await self._embeddings.embed(slot, [question], sparse=hybrid)
        embedded = time.perf_counter()
        out = batch.outputs[0]
        assert out.dense is not None
        dense = out.dense.tolist()
        sparse = {int(k): float(v) for k, v in out.sparse.items()} if hybrid and out.sparse else None
        rerank, skipped = self._wants_rerank(options.rerank), None
        if rerank and (skipped := self._rerank_changes_nothing(slot, sparse is not None)):
            rerank = False
        limit = min(max(options.top_k * 4, 20), _MAX_CANDIDATES) if rerank else options.top_k
        where = options.filter
        hits = await self._run(lambda s: s.search(name, dense, sparse, limit, where))
        searched = time.perf_counter()
        tokens = batch.prompt_tokens
        scored = [(hit, hit.score) for hit in hits[: options.top_k]]
        if rerank and hits:
            reranker = await self._registry.tier_for("reranker", "reranker")
            texts = [h.text for h in hits]
            results, used = await self._rerank.scores(reranker, question, texts, options.top_k, normalize=True)
            scored = [(hits[r.index], r.score) for r in results]
            tokens += used
        done = time.perf_counter()
        sources = [_source(hit, score, n) for n, (hit, score) in enumerate(scored, 1)]
        return QueryResponse(
            data=sources,
            model=slot.model,
            hybrid=sparse is not None,
            reranked=rerank,
            rerank_skipped=skipped,
            documents_retrieved=len(sources),
            retrieval_time_ms=_ms(done - started),
            timings=Timings(_ms(embedded - started), _ms(searched - embedded), _ms(done - searched)),
            usage=Usage(tokens, tokens),
        )

    def _wants_rerank(self, asked: bool | None) -> bool:
        if asked is not None:
            return asked  # True without a reranker tier: tier_for answers 404 model_not_available
        return self._registry.slots["reranker"].state is not TierState.ABSENT

    def _rerank_changes_nothing(self, embedder: TierSlot, hybrid: bool) -> str | None:
        """Why reranking cannot change the search's order, if it cannot: a reranker that scores
        with the embedding tier that retrieved (the default `tier:embedding`) computes the same
        cosine similarity on the same dense vectors, at 10-40x the search's time."""
        spec = (self._registry.slots["reranker"].settings.model_path or "").strip()
        if spec != f"tier:{embedder.name}" or hybrid or embedder.capabilities - {"dense"}:
            return None  # another model, or fused / multi-vector scores: the order can change
        return (
            f"the reranker tier scores with the {embedder.name} tier's model, which retrieved these chunks by the"
            " same similarity: reranking cannot change their order (configure a cross-encoder RERANKER_MODEL_PATH)"
        )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _collection(info: CollectionInfo) -> Collection:
    c = info.config
    return Collection(
        id=info.name,
        created_at=int(c.get("created_at", 0)),
        model=str(c.get("model", "")),
        dimension=int(c.get("dimension", 0)),
        hybrid=bool(c.get("hybrid", False)),
        chunk_size=int(c.get("chunk_size", 0)),
        chunk_overlap=int(c.get("chunk_overlap", 0)),
        chunks=info.chunks,
        metadata=dict(c.get("metadata") or {}),
    )


def _document(hit: Hit) -> Document:
    p = hit.payload
    return Document(
        id=hit.document_id,
        created_at=int(p.get("created_at", 0)),
        chunks=int(p.get("chunks", 0)),
        characters=int(p.get("characters", 0)),
        metadata=dict(p.get("metadata") or {}),
    )


def _source(hit: Hit, score: float, citation: int) -> Source:
    return Source(
        id=hit.id,
        citation=citation,
        document_id=hit.document_id,
        chunk_index=hit.index,
        text=hit.text,
        metadata=dict(hit.payload.get("metadata") or {}),
        score=round(float(score), 6),
        search_score=round(hit.score, 6),
    )
