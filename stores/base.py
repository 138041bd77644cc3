"""The vector store contract: neutral types and one small ABC that collections are kept in.

A store holds named collections of chunks. Each chunk carries a dense vector, optionally a
sparse one (BGE-M3's lexical weights, for hybrid search), and a payload: the document it came
from, its place in that document, its text and the document's metadata. Stores are not assumed
to be thread-safe: `service.jobs.collections` calls one from a single worker thread.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from typing import Any

from kernel.errors import InvalidRequestError

# Names become folder names in embedded stores: letters, digits, `_` and `-` only, so no name
# can climb out of the data folder (`..`, `/`, `\`, NUL) or clash on case-insensitive disks.
COLLECTION_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
Scalar = str | int | float | bool | None


def check_collection_name(name: str) -> str:
    if not COLLECTION_NAME.fullmatch(name):
        raise InvalidRequestError(
            "Collection names are 1-64 characters: lowercase letters, digits, '_' and '-', starting with a"
            " letter or digit",
            param="name",
            code="invalid_collection_name",
        )
    return name


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    name: str
    chunks: int
    config: dict[str, Any]  # what the service stored at creation (embedding model, dimension, chunking)


@dataclass(frozen=True, slots=True)
class StoredChunk:
    document_id: str
    index: int
    text: str
    dense: list[float]
    sparse: dict[int, float] | None = None
    payload: dict[str, Any] = field(default_factory=dict)  # document-level fields, on every chunk


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    document_id: str
    index: int
    text: str
    payload: dict[str, Any]


class VectorStore(abc.ABC):
    """Collections of chunks. Calls that name a missing collection raise `CollectionNotFoundError`."""

    name: str = "store"

    @abc.abstractmethod
    def create_collection(self, name: str, dimension: int, sparse: bool, config: dict[str, Any]) -> None:
        """Raise `ConflictError` when `name` exists."""

    @abc.abstractmethod
    def collection(self, name: str) -> CollectionInfo: ...

    @abc.abstractmethod
    def collections(self) -> list[CollectionInfo]: ...

    @abc.abstractmethod
    def drop_collection(self, name: str) -> None: ...

    @abc.abstractmethod
    def replace_documents(self, name: str, chunks: list[StoredChunk]) -> None:
        """Store `chunks`, first removing every chunk of the documents they belong to (re-adding a
        document id replaces it, even when it now has fewer chunks)."""

    @abc.abstractmethod
    def delete_document(self, name: str, document_id: str) -> int:
        """Remove a document's chunks; return how many there were (0: no such document)."""

    @abc.abstractmethod
    def documents(self, name: str, limit: int, after: str | None) -> tuple[list[Hit], bool]:
        """Each document's first chunk, in a stable order, starting after document `after`; and
        whether more follow."""

    @abc.abstractmethod
    def search(
        self,
        name: str,
        dense: list[float],
        sparse: dict[int, float] | None,
        limit: int,
        where: dict[str, Scalar] | None = None,
    ) -> list[Hit]:
        """The `limit` best chunks, best first: by cosine similarity, or, given `sparse` in a
        collection created with sparse vectors, by reciprocal-rank fusion of dense and sparse
        results. `where` keeps chunks whose document metadata equals every given value."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and connections."""
