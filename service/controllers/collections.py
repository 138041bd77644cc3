"""/v1/collections: RAG collections, their documents, retrieval, and chat completions grounded in them.

The RAG completion is `POST /v1/collections/{name}/chat/completions`: the chat completion request
and answer, unchanged but for `rag` options in and `sources` + timings out. So any OpenAI client
uses a collection by pointing its base URL at `/v1/collections/{name}` (no extra fields needed),
and the answer comes from the same path as /v1/chat/completions, streaming included.
Mutations are admin routes: they write to disk and change every client's answers.
"""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, post
from litestar.params import Parameter

from service.jobs.collections import Collections
from service.jobs.rag import RagChat
from service.metrics import RequestRecord
from service.schemas.collections import (
    Collection,
    CollectionCreate,
    CollectionList,
    Deleted,
    DocumentList,
    DocumentsAdd,
    DocumentsAdded,
    QueryRequest,
    QueryResponse,
    RagChatCompletion,
    RagChatCompletionChunk,
    RagChatRequest,
)
from service.serving.generation import Generation
from service.serving.streaming import EventStream, Streamed

# Every route reads the store (503 when it cannot) and names a collection (404) or may create one (409).
_ERRORS = {"errors": (404, 409, 503)}
_ADMIN = {"admin": True, **_ERRORS}


class CollectionsController(Controller):
    path = "/v1/collections"

    @post(status_code=200, summary="Create a collection", opt=_ADMIN)
    async def create(self, data: CollectionCreate, collections: Collections) -> Collection:
        return await collections.create(data)

    @get(summary="List collections", opt=_ERRORS)
    async def list_collections(self, collections: Collections) -> CollectionList:
        return CollectionList(await collections.all())

    @get("/{name:str}", summary="Get a collection", opt=_ERRORS)
    async def retrieve(self, name: str, collections: Collections) -> Collection:
        return await collections.get(name)

    @delete("/{name:str}", status_code=200, summary="Delete a collection and its documents", opt=_ADMIN)
    async def remove(self, name: str, collections: Collections) -> Deleted:
        await collections.delete(name)
        return Deleted(id=name, object="collection.deleted")

    @post("/{name:str}/query", status_code=200, summary="Retrieve the chunks most relevant to a query", opt=_ERRORS)
    async def query(self, name: str, data: QueryRequest, collections: Collections) -> QueryResponse:
        return await collections.query(name, data.query, data)

    @post(
        "/{name:str}/chat/completions",
        status_code=200,
        summary="Create a chat completion grounded in a collection (RAG)",
        opt={"stream_events": RagChatCompletionChunk, **_ERRORS},
    )
    async def chat(
        self, name: str, data: RagChatRequest, rag: RagChat, generation: Generation, record: RequestRecord
    ) -> RagChatCompletion | EventStream:
        answer = await rag.create(name, data, record)
        return EventStream(answer.events(generation.drain)) if isinstance(answer, Streamed) else answer


class DocumentsController(Controller):
    path = "/v1/collections/{name:str}/documents"

    @post(status_code=200, summary="Add documents (chunked and embedded)", opt=_ADMIN)
    async def add(self, name: str, data: DocumentsAdd, collections: Collections) -> DocumentsAdded:
        return await collections.add(name, data)

    @get(summary="List a collection's documents", opt=_ERRORS)
    async def list_documents(
        self,
        name: str,
        collections: Collections,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        after: Annotated[str | None, Parameter(max_length=256)] = None,
    ) -> DocumentList:
        docs, more = await collections.documents(name, limit, after)
        first, last = (docs[0].id, docs[-1].id) if docs else (None, None)
        return DocumentList(docs, more, first, last)

    # `path`: document ids may contain `/` (file paths); Litestar hands them over with a leading one.
    @delete("/{document_id:path}", status_code=200, summary="Delete a document", opt=_ADMIN)
    async def remove(self, name: str, document_id: str, collections: Collections) -> Deleted:
        document_id = document_id.removeprefix("/")
        chunks = await collections.delete_document(name, document_id)
        return Deleted(id=document_id, object="collection.document.deleted", chunks=chunks)
