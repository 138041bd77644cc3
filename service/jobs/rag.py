"""Chat completions grounded in a collection (RAG): retrieve for the last user message, wrap the
passages into that turn, and answer through the same path as `/v1/chat/completions`; the answer
(or a stream's first event) carries the sources and retrieval timings."""

from __future__ import annotations

from typing import Any

import msgspec

from kernel.errors import InvalidRequestError
from service.jobs.collections import Collections
from service.metrics import RequestRecord
from service.schemas.chat import ChatCompletion, ChatMessage
from service.schemas.collections import RagChatCompletion, RagChatCompletionChunk, RagChatRequest, Retrieval, Source
from service.serving.chat import serve_chat
from service.serving.generation import Generation
from service.serving.streaming import Streamed


class RagChat:
    def __init__(self, collections: Collections, generation: Generation) -> None:
        self._collections = collections
        self._generation = generation

    async def create(self, name: str, data: RagChatRequest, record: RequestRecord) -> RagChatCompletion | Streamed:
        self._generation.target(data.model, data.adapter)  # an unknown model or adapter: 404 before retrieval
        found = await self._collections.query(name, last_question(data.messages), data.rag or Retrieval())
        extra: dict[str, Any] = {
            "sources": found.data,
            "documents_retrieved": found.documents_retrieved,
            "retrieval_time_ms": found.retrieval_time_ms,
            "reranked": found.reranked,
            "rerank_skipped": found.rerank_skipped,
        }
        grounded = msgspec.structs.replace(data, messages=with_context(data.messages, found.data))

        answer = await serve_chat(grounded, self._generation, record)
        if isinstance(answer, ChatCompletion):
            return RagChatCompletion(**msgspec.structs.asdict(answer), **extra)
        # A stream's first event carries the sources.
        first, *rest = answer.opening
        answer.opening = [RagChatCompletionChunk(**msgspec.structs.asdict(first), **extra), *rest]
        return answer


def with_context(messages: list[ChatMessage], sources: list[Source]) -> list[ChatMessage]:
    """The conversation with its last user message wrapped in the retrieved passages. In that turn,
    not in a system message: small models (Gemma 3 270M) answer from passages put before the
    question, and repeat the instructions when they come as a system prompt."""
    # Numbers only: each source's `citation` maps them to documents; Gemma 270M echoed prompts that named them.
    passages = "\n\n".join(f"[{s.citation}] {s.text}" for s in sources)
    last = max(i for i, m in enumerate(messages) if m.role == "user")
    question = messages[last].text()
    grounded = (
        "Answer the question using the passages below; cite them like [1]. If they do not contain the answer,"
        f" say you do not know.\n\nPassages:\n{passages or '(none found)'}\n\nQuestion: {question}"
    )
    return [*messages[:last], ChatMessage(role="user", content=grounded), *messages[last + 1 :]]


def last_question(messages: list[ChatMessage]) -> str:
    """What to retrieve for: the last user message (400 when there is none, or it is empty)."""
    users = [m for m in messages if m.role == "user"]
    if not users or not users[-1].text().strip():
        raise InvalidRequestError("RAG needs a last user message to retrieve for", param="messages")
    return users[-1].text()
