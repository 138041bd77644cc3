from __future__ import annotations

from litestar import Controller, post

from service.metrics import RequestRecord
from service.schemas.completions import Completion, CompletionRequest
from service.serving.chat import serve_completion
from service.serving.dispatch import Dispatcher
from service.serving.streaming import EventStream, Streamed
from service.tiers.registry import Registry


class CompletionsController(Controller):
    path = "/v1/completions"

    @post(status_code=200, summary="Create a completion (legacy)", opt={"stream_events": Completion})
    async def create(
        self, data: CompletionRequest, registry: Registry, dispatch: Dispatcher, record: RequestRecord
    ) -> Completion | EventStream:
        answer = await serve_completion(data, registry, dispatch, record)
        return EventStream(answer.events(dispatch.drain)) if isinstance(answer, Streamed) else answer
