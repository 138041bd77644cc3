"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`), served by
service.serving.messages. `?beta=true` and the `anthropic-beta` / `anthropic-version` headers
change nothing (a remote tier relaying Messages passes the headers on)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post
from litestar import Response as HttpResponse

from service.metrics import RequestRecord
from service.schemas.messages import CountTokensRequest, CountTokensResponse, Message, MessagesRequest
from service.serving.generation import Generation
from service.serving.messages import count_tokens, create_message
from service.serving.streaming import EventStream

_STREAMED = (
    "With `stream: true`: Anthropic's named events, each `event: <type>` and `data: <json>`: message_start, "
    "content_block_start / content_block_delta / content_block_stop per block, message_delta, message_stop; an "
    "error after the start as one `event: error`"
)


class MessagesController(Controller):
    path = "/v1/messages"

    @post(status_code=200, summary="Create a message (Anthropic Messages API)", opt={"stream_events": _STREAMED})
    async def create(
        self, data: MessagesRequest, request: Request[Any, Any, Any], generation: Generation, record: RequestRecord
    ) -> Message | EventStream | HttpResponse[Any]:
        answer = await create_message(data, generation, record, request.body, request.headers)
        return answer if isinstance(answer, Message | HttpResponse) else EventStream(answer)

    @post("/count_tokens", status_code=200, summary="Count a message's input tokens (Anthropic)")
    async def count_tokens(self, data: CountTokensRequest, generation: Generation) -> CountTokensResponse:
        return CountTokensResponse(await count_tokens(data, generation))
