from __future__ import annotations

from litestar import Controller, post

from service.metrics import RequestRecord
from service.schemas.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from service.serving.chat import serve_chat
from service.serving.generation import Generation
from service.serving.streaming import EventStream, Streamed


class ChatController(Controller):
    path = "/v1/chat/completions"

    @post(status_code=200, summary="Create a chat completion", opt={"stream_events": ChatCompletionChunk})
    async def create(
        self, data: ChatCompletionRequest, generation: Generation, record: RequestRecord
    ) -> ChatCompletion | EventStream:
        answer = await serve_chat(data, generation, record)
        return EventStream(answer.events(generation.drain)) if isinstance(answer, Streamed) else answer
