"""The Qdrant store alone (embedded, on disk): what the service relies on, without a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel.errors import ConflictError, InvalidRequestError, NotFoundError
from stores.base import StoredChunk
from stores.factory import create_store


def _chunk(doc: str, index: int, vector: list[float], **meta: object) -> StoredChunk:
    return StoredChunk(doc, index, f"{doc} {index}", vector, None, {"metadata": meta})


def test_names_cannot_leave_the_folder_even_when_the_store_is_called_directly(tmp_path: Path) -> None:
    store = create_store(path=str(tmp_path / "data"))
    try:
        for name in ("..", "../x", "a/b", "a\\b", "x\x00", "", "A", "x" * 65, ".hidden"):
            with pytest.raises(InvalidRequestError):
                store.create_collection(name, 2, False, {})
            with pytest.raises(InvalidRequestError):
                store.collection(name)
        assert not (tmp_path / "x").exists() and not (tmp_path / "data" / "collection").exists()
    finally:
        store.close()


def test_replace_delete_filter_and_reopen(tmp_path: Path) -> None:
    store = create_store(path=str(tmp_path))
    store.create_collection("c", 2, False, {"model": "m"})
    with pytest.raises(ConflictError):
        store.create_collection("c", 2, False, {})
    store.replace_documents("c", [_chunk("a", 0, [1, 0], k=1.5), _chunk("a", 1, [1, 0.1], k=1.5)])
    store.replace_documents("c", [_chunk("b", 0, [0, 1], k=None, tag="x")])
    store.replace_documents("c", [_chunk("a", 0, [1, 0], k=1.5)])  # replaces both chunks of "a"
    assert store.collection("c").chunks == 2
    assert [h.document_id for h in store.search("c", [1, 0], None, 5, {"k": 1.5})] == ["a"]
    assert [h.document_id for h in store.search("c", [1, 0], None, 5, {"k": None})] == ["b"]
    assert [h.document_id for h in store.search("c", [1, 0], None, 5, {"tag": "y"})] == []
    store.close()

    store = create_store(path=str(tmp_path))  # a restart: everything is read back from disk
    try:
        assert store.collection("c").config == {"model": "m"}
        assert store.delete_document("c", "a") == 1 and store.delete_document("c", "a") == 0
        store.drop_collection("c")
        with pytest.raises(NotFoundError):
            store.search("c", [1, 0], None, 1)
    finally:
        store.close()
