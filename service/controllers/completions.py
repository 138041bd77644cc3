from __future__ import annotations

from litestar import Controller, post

from service.metrics import RequestRecord
from service.schemas.completions import Completion, CompletionRequest
from service.serving.chat import serve_completion
from service.serving.generation import Generation
from service.serving.streaming import EventStream, Streamed


class CompletionsController(Controller):
    path = "/v1/completions"

    @post(status_code=200, summary="Create a completion (legacy)", opt={"stream_events": Completion})
    async def create(
        self, data: CompletionRequest, generation: Generation, record: RequestRecord
    ) -> Completion | EventStream:
        answer = await serve_completion(data, generation, record)
        return EventStream(answer.events(generation.drain)) if isinstance(answer, Streamed) else answer
