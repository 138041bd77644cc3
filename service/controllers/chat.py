from __future__ import annotations

from litestar import Controller, post

from service.metrics import RequestRecord
from service.schemas.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from service.serving.chat import serve_chat
from service.serving.dispatch import Dispatcher
from service.serving.streaming import EventStream, Streamed
from service.tiers.registry import Registry


class ChatController(Controller):
    path = "/v1/chat/completions"

    @post(status_code=200, summary="Create a chat completion", opt={"stream_events": ChatCompletionChunk})
    async def create(
        self, data: ChatCompletionRequest, registry: Registry, dispatch: Dispatcher, record: RequestRecord
    ) -> ChatCompletion | EventStream:
        answer = await serve_chat(data, registry, dispatch, record)
        return EventStream(answer.events(dispatch.drain)) if isinstance(answer, Streamed) else answer
