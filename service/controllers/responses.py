"""OpenAI's Responses API (`/v1/responses`): served by service.serving.responses; stored responses
(service.serving.response_store) answer GET, DELETE and `input_items`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Controller, Request, delete, get, post
from litestar import Response as HttpResponse
from litestar.params import Parameter

from service.metrics import RequestRecord
from service.schemas.responses import DeletedResponse, InputItemList, Response, ResponsesRequest
from service.serving.generation import Generation
from service.serving.response_store import ResponseStore
from service.serving.responses import create_response, input_page
from service.serving.streaming import EventStream

_STREAMED = (
    "With `stream: true`: the typed Responses events, each `event: <type>` and `data: <json>` with a "
    "`sequence_number`: response.created, response.in_progress, per output item response.output_item.added / "
    ".done with response.reasoning_text.delta / .done (thinking), response.content_part.added / .done and "
    "response.output_text.delta / .done (text), response.function_call_arguments.delta / .done (calls); then "
    "response.completed (or response.incomplete at max_output_tokens); an error after the start as `event: error`"
)
_STORED = {"errors": (404,)}  # `response_not_found`: never stored, deleted or evicted


class ResponsesController(Controller):
    path = "/v1/responses"

    @post(status_code=200, summary="Create a model response (OpenAI Responses API)", opt={"stream_events": _STREAMED})
    async def create(
        self,
        data: ResponsesRequest,
        request: Request[Any, Any, Any],
        generation: Generation,
        record: RequestRecord,
        responses: ResponseStore,
    ) -> Response | EventStream | HttpResponse[Any]:
        answer = await create_response(data, request.body, generation, record, responses)
        return answer if isinstance(answer, Response | HttpResponse) else EventStream(answer)

    @get("/{response_id:str}", summary="A stored response", opt=_STORED)
    async def retrieve(self, response_id: str, responses: ResponseStore) -> dict[str, Any]:
        return responses.get(response_id).response

    @delete("/{response_id:str}", status_code=200, summary="Delete a stored response", opt=_STORED)
    async def remove(self, response_id: str, responses: ResponseStore) -> DeletedResponse:
        responses.delete(response_id)
        return DeletedResponse(id=response_id)

    @get("/{response_id:str}/input_items", summary="A stored response's input items (a cursor page)", opt=_STORED)
    async def input_items(
        self,
        response_id: str,
        responses: ResponseStore,
        after: str | None = None,
        before: str | None = None,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        order: Literal["asc", "desc"] = "desc",
    ) -> InputItemList:
        return input_page(responses, response_id, after=after, before=before, limit=limit, order=order)
