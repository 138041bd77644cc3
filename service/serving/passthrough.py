"""Responses and Messages requests relayed as they are to a remote tier's upstreams
(`{TIER}_REMOTE_PASSTHROUGH`, backends/remote_relay.py): no translation onto chat, no response
cache, no stored responses of ours (the upstream owns `store` and `previous_response_id`); keys and
rate limits have applied before, and the answer's usage is recorded for /metrics and /v1/stats."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

from litestar import Response as HttpResponse

from backends.base import Usage
from backends.remote_relay import Api, Relayed
from kernel.errors import InvalidRequestError, LLMServiceError
from service.metrics import RequestRecord
from service.schemas.stream_events import NamedEvent, named_frame
from service.serving.generation import Generation
from service.serving.streaming import EventStream
from service.tiers.families import GENERATION
from service.tiers.registry import Target


def relays(target: Target, api: Api) -> bool:
    """Whether the request's tier passes `api` straight to its upstreams."""
    return GENERATION.relays(target.slot, api)


async def relay(
    api: Api,
    target: Target,
    raw: bytes,
    headers: Mapping[str, str],
    generation: Generation,
    record: RequestRecord,
    error: Callable[[int, LLMServiceError], NamedEvent],
) -> HttpResponse[Any]:
    """The upstream's answer to the request's body (`raw`, as the client sent it): its status and
    body, or its events streamed (an error after the first one as one `error` event of `api`'s form,
    `error(events sent, exc)`: the upstream numbers its events from 0, so that is the next number)."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidRequestError("The request body is not JSON") from None
    slot = await generation.registry.ensure_loaded(target.slot)
    record.tier = slot.name
    relayed = await GENERATION.relay(slot, api, body, str(body.get("model", "")), headers)
    if relayed.status < 400:  # an upstream generated (its 4xx did not)
        record.generated, record.ttft = True, time.monotonic() - record.started
    if relayed.events is None:
        _note(record, relayed.usage)
        return HttpResponse(relayed.body, status_code=relayed.status, media_type=relayed.content_type)
    return EventStream(_events(relayed, record, error))


async def _events(
    relayed: Relayed, record: RequestRecord, error: Callable[[int, LLMServiceError], NamedEvent]
) -> AsyncGenerator[bytes, None]:
    assert relayed.events is not None
    sent = 0
    try:
        async for event in relayed.events:
            yield event
            sent += 1
    except LLMServiceError as exc:  # after the first event: the client already has part of the answer
        record.failed = True
        yield named_frame(error(sent, exc))
    finally:
        await relayed.events.aclose()  # a client gone mid-stream: closes the upstream request
        _note(record, relayed.usage)


def _note(record: RequestRecord, usage: Usage | None) -> None:
    if usage is not None:
        record.prompt_tokens, record.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        record.cached_tokens = usage.cached_tokens
