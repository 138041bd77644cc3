"""Qdrant through `qdrant-client`: embedded on disk (`path=`) or a Qdrant server (`url=`), one API.

Embedded mode keeps every collection in `<path>/collection/<name>/` (SQLite) and searches it in
memory; it locks the folder, so one process serves it. A server takes over past a few hundred
thousand chunks, or when several processes share collections: set COLLECTIONS_URL.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from kernel.errors import ConflictError, LLMServiceError, NotFoundError, StoreUnavailableError
from stores.base import CollectionInfo, Hit, Scalar, StoredChunk, VectorStore, check_collection_name

_DENSE, _SPARSE = "dense", "sparse"
_POINT_IDS = uuid.UUID("5f0d8a43-7c1e-4d55-9a57-1b0c1d3c2e61")  # namespace of the chunk ids below
_UPSERT_BATCH = 256  # points per upsert call: a server refuses very large request bodies


def point_id(document_id: str, index: int) -> str:
    """Stable per (document, chunk): Qdrant ids are integers or UUIDs, document ids are any text."""
    return str(uuid.uuid5(_POINT_IDS, f"{index}:{document_id}"))


@contextmanager
def _store_errors(where: str) -> Iterator[None]:
    """Client failures (server unreachable, refused request, locked folder) into our error tree."""
    try:
        yield
    except LLMServiceError:
        raise
    except (ResponseHandlingException, UnexpectedResponse, OSError, RuntimeError) as exc:
        raise StoreUnavailableError(f"The vector store failed ({where}): {type(exc).__name__}") from exc


class QdrantStore(VectorStore):
    name = "qdrant"

    def __init__(self, *, path: str | None = None, url: str | None = None, api_key: str | None = None) -> None:
        with _store_errors("open"):
            # A second process on the same folder gets RuntimeError ("already accessed") here.
            self._client = QdrantClient(url=url, api_key=api_key) if url else QdrantClient(path=path)

    def _exists(self, name: str) -> None:
        check_collection_name(name)  # again here: embedded mode turns the name into a folder
        if not self._client.collection_exists(name):
            raise NotFoundError(f"Collection not found: {name}", param="name", code="collection_not_found")

    def create_collection(self, name: str, dimension: int, sparse: bool, config: dict[str, Any]) -> None:
        check_collection_name(name)
        with _store_errors("create"):
            if self._client.collection_exists(name):
                raise ConflictError(f"Collection {name} already exists", param="name", code="collection_exists")
            self._client.create_collection(
                name,
                vectors_config={_DENSE: models.VectorParams(size=dimension, distance=models.Distance.COSINE)},
                sparse_vectors_config={_SPARSE: models.SparseVectorParams()} if sparse else None,
                metadata=config,
            )

    def collection(self, name: str) -> CollectionInfo:
        with _store_errors("read"):
            self._exists(name)
            info = self._client.get_collection(name)
            count = self._client.count(name, exact=True).count
        return CollectionInfo(name, count, dict(info.config.metadata or {}))

    def collections(self) -> list[CollectionInfo]:
        with _store_errors("list"):
            names = sorted(c.name for c in self._client.get_collections().collections)
        # Collections made by other tools on a shared server are listed only when their names are ours.
        return [self.collection(n) for n in names if _valid(n)]

    def drop_collection(self, name: str) -> None:
        with _store_errors("delete"):
            self._exists(name)
            self._client.delete_collection(name)

    def replace_documents(self, name: str, chunks: list[StoredChunk]) -> None:
        points = [
            models.PointStruct(
                id=point_id(c.document_id, c.index),
                vector={
                    _DENSE: c.dense,
                    **({_SPARSE: _sparse(c.sparse)} if c.sparse is not None else {}),
                },
                payload={**c.payload, "document_id": c.document_id, "chunk": c.index, "text": c.text},
            )
            for c in chunks
        ]
        with _store_errors("write"):
            self._exists(name)
            # One delete for all: embedded Qdrant scans every point per filtered delete.
            documents = list(dict.fromkeys(c.document_id for c in chunks))
            any_of = models.FieldCondition(key="document_id", match=models.MatchAny(any=documents))
            self._client.delete(name, points_selector=models.FilterSelector(filter=models.Filter(must=[any_of])))
            for start in range(0, len(points), _UPSERT_BATCH):
                self._client.upsert(name, points=points[start : start + _UPSERT_BATCH])

    def delete_document(self, name: str, document_id: str) -> int:
        with _store_errors("delete"):
            self._exists(name)
            count = self._client.count(name, count_filter=_of_document(document_id).filter, exact=True).count
            if count:
                self._client.delete(name, points_selector=_of_document(document_id))
        return count

    def documents(self, name: str, limit: int, after: str | None) -> tuple[list[Hit], bool]:
        firsts = models.Filter(must=[models.FieldCondition(key="chunk", match=models.MatchValue(value=0))])
        with _store_errors("list"):
            self._exists(name)
            # Scrolling is in point-id order, from `offset` inclusive: start at `after`'s first chunk.
            points, _ = self._client.scroll(
                name,
                scroll_filter=firsts,
                limit=limit + 2,
                offset=point_id(after, 0) if after is not None else None,
                with_payload=True,
            )
        hits = [_hit(p.id, 0.0, p.payload) for p in points]
        if after is not None:
            hits = [h for h in hits if h.document_id != after]
        return hits[:limit], len(hits) > limit

    def search(
        self,
        name: str,
        dense: list[float],
        sparse: dict[int, float] | None,
        limit: int,
        where: dict[str, Scalar] | None = None,
    ) -> list[Hit]:
        query_filter = _where(where)
        with _store_errors("search"):
            self._exists(name)
            if sparse is not None:
                # Hybrid: each kind finds its own candidates, reciprocal-rank fusion merges the lists.
                prefetch = [
                    models.Prefetch(query=dense, using=_DENSE, limit=limit, filter=query_filter),
                    models.Prefetch(query=_sparse(sparse), using=_SPARSE, limit=limit, filter=query_filter),
                ]
                found = self._client.query_points(
                    name, prefetch=prefetch, query=models.FusionQuery(fusion=models.Fusion.RRF), limit=limit
                )
            else:
                found = self._client.query_points(
                    name, query=dense, using=_DENSE, limit=limit, query_filter=query_filter, with_payload=True
                )
        return [_hit(p.id, p.score, p.payload) for p in found.points]

    def close(self) -> None:
        self._client.close()


def _valid(name: str) -> bool:
    try:
        check_collection_name(name)
    except LLMServiceError:
        return False
    return True


def _of_document(document_id: str) -> models.FilterSelector:
    return models.FilterSelector(
        filter=models.Filter(
            must=[models.FieldCondition(key="document_id", match=models.MatchValue(value=document_id))]
        )
    )


def _where(where: dict[str, Scalar] | None) -> models.Filter | None:
    if not where:
        return None
    return models.Filter(must=[_equals(f"metadata.{key}", value) for key, value in where.items()])


def _equals(key: str, value: Scalar) -> Any:
    if value is None:
        return models.IsNullCondition(is_null=models.PayloadField(key=key))
    if isinstance(value, float):  # Qdrant matches text, integers and booleans exactly; numbers by range
        return models.FieldCondition(key=key, range=models.Range(gte=value, lte=value))
    return models.FieldCondition(key=key, match=models.MatchValue(value=value))


def _sparse(weights: dict[int, float]) -> models.SparseVector:
    return models.SparseVector(indices=list(weights), values=list(weights.values()))


def _hit(point: Any, score: float, payload: dict[str, Any] | None) -> Hit:
    payload = dict(payload or {})
    document_id, index, text = payload.pop("document_id", ""), payload.pop("chunk", 0), payload.pop("text", "")
    return Hit(str(point), float(score), str(document_id), int(index), str(text), payload)
