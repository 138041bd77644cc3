"""Build the vector store the settings name. `qdrant_client` is imported only here, on first use,
so a server without the `rag` extra starts and answers every other endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kernel.engines import missing_modules
from kernel.errors import StoreUnavailableError

if TYPE_CHECKING:
    from stores.base import VectorStore


def create_store(*, path: str, url: str = "", api_key: str = "") -> VectorStore:
    """A Qdrant server when `url` is set (with `api_key` if it asks for one), else Qdrant's embedded
    mode keeping its files in `path`."""
    if missing_modules(["qdrant_client"]):
        raise StoreUnavailableError(
            "Collections need qdrant-client, which is not installed: pip install 'llmservice[rag]'"
        )
    from stores.qdrant import QdrantStore

    if url:
        return QdrantStore(url=url, api_key=api_key or None)
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailableError(f"Cannot create COLLECTIONS_DIR {path!r}: {exc.strerror or exc}") from None
    return QdrantStore(path=str(folder))
