from __future__ import annotations

from litestar import Controller, post

from service.dispatch import Dispatcher
from service.metrics import RequestRecord
from service.registry import Registry
from service.schemas.completions import Completion, CompletionRequest
from service.serving import serve_completion
from service.streaming import EventStream, Streamed


class CompletionsController(Controller):
    path = "/v1/completions"

    @post(status_code=200, summary="Create a completion (legacy)", opt={"stream_events": Completion})
    async def create(
        self, data: CompletionRequest, registry: Registry, dispatch: Dispatcher, record: RequestRecord
    ) -> Completion | EventStream:
        answer = await serve_completion(data, registry, dispatch, record)
        return EventStream(answer.events(dispatch.drain)) if isinstance(answer, Streamed) else answer
