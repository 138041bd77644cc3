from __future__ import annotations

from litestar import Controller, post

from service.dispatch import Dispatcher
from service.errors import InvalidRequestError
from service.generation import collect, engine_request, first_chunk, new_id, now
from service.metrics import RequestRecord
from service.registry import Registry
from service.schemas.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Delta,
)
from service.streaming import EventStream, event_stream


class ChatController(Controller):
    path = "/v1/chat/completions"

    @post(status_code=200)
    async def create(
        self, data: ChatCompletionRequest, registry: Registry, dispatch: Dispatcher, record: RequestRecord
    ) -> ChatCompletion | EventStream:
        if not data.messages:
            raise InvalidRequestError("messages must contain at least one message", param="messages")
        slot = registry.generation_slot(data.model)
        messages = tuple({"role": _role(m.role), "content": m.text()} for m in data.messages)
        request = engine_request(
            data, slot.settings, max_tokens=data.max_completion_tokens or data.max_tokens, messages=messages
        )
        stream = await dispatch.generate("chat", slot, request, record)
        cid, created, model = new_id("chatcmpl"), now(), data.model
        if not data.stream:
            text, finish_reason, usage = await collect(stream)
            choice = ChatChoice(0, AssistantMessage("assistant", text), finish_reason)
            return ChatCompletion(cid, created, model, [choice], usage)

        first = await first_chunk(stream)

        def piece(text: str, finish: str | None) -> ChatCompletionChunk:
            delta = Delta(content=text) if text else Delta()
            return ChatCompletionChunk(cid, created, model, [ChunkChoice(0, delta, finish)])

        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        events = event_stream(
            stream,
            first,
            opening=ChatCompletionChunk(cid, created, model, [ChunkChoice(0, Delta(role="assistant", content=""))]),
            piece=piece,
            usage_event=(lambda u: ChatCompletionChunk(cid, created, model, [], usage=u)) if include_usage else None,
            drain=dispatch.drain,
        )
        return EventStream(events)


def _role(role: str) -> str:
    # OpenAI's newer "developer" role is the system role for every chat template we know.
    return "system" if role == "developer" else role
