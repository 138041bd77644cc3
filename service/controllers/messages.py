"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`), served by
service.serving.messages. `?beta=true` and the `anthropic-beta` / `anthropic-version` headers
change nothing."""

from __future__ import annotations

from litestar import Controller, post

from service.metrics import RequestRecord
from service.schemas.common import SamplingFields
from service.schemas.messages import CountTokensRequest, CountTokensResponse, Message, MessagesRequest
from service.serving.dispatch import Dispatcher
from service.serving.generation import engine_request
from service.serving.input_limits import check_prompt_length
from service.serving.message_blocks import message_prompt
from service.serving.messages import create_message
from service.serving.streaming import EventStream
from service.tiers.families import GENERATION
from service.tiers.registry import Registry

_STREAMED = (
    "With `stream: true`: Anthropic's named events, each `event: <type>` and `data: <json>`: message_start, "
    "content_block_start / content_block_delta / content_block_stop per block, message_delta, message_stop; an "
    "error after the start as one `event: error`"
)


class MessagesController(Controller):
    path = "/v1/messages"

    @post(status_code=200, summary="Create a message (Anthropic Messages API)", opt={"stream_events": _STREAMED})
    async def create(
        self, data: MessagesRequest, registry: Registry, dispatch: Dispatcher, record: RequestRecord
    ) -> Message | EventStream:
        answer = await create_message(data, registry, dispatch, record)
        return answer if isinstance(answer, Message) else EventStream(answer)

    @post("/count_tokens", status_code=200, summary="Count a message's input tokens (Anthropic)")
    async def count_tokens(self, data: CountTokensRequest, registry: Registry) -> CountTokensResponse:
        slot = registry.generation_target(data.model)[0]  # an adapter does not change tokens
        prompt = message_prompt(data)
        request = engine_request(
            SamplingFields(model=data.model),
            slot.settings,
            max_tokens=1,
            messages=prompt.messages,
            tools=prompt.plan.tools,
            thinking=prompt.thinking,
        )
        await registry.ensure_loaded(slot)
        check_prompt_length(request, slot.context_length or slot.settings.n_ctx)  # bounds the tokenizer's work
        return CountTokensResponse(len(await GENERATION.tokenize(slot, request)))
