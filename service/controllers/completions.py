from __future__ import annotations

from typing import Any

from litestar import Controller, post

from kernel.errors import InvalidRequestError
from service.dispatch import Dispatcher
from service.generation import collect, engine_request, first_chunk, new_id, now
from service.metrics import RequestRecord
from service.registry import Registry
from service.schemas.completions import Completion, CompletionChoice, CompletionRequest
from service.streaming import EventStream, event_stream


class CompletionsController(Controller):
    path = "/v1/completions"

    @post(status_code=200, summary="Create a completion (legacy)", opt={"stream_events": Completion})
    async def create(
        self, data: CompletionRequest, registry: Registry, dispatch: Dispatcher, record: RequestRecord
    ) -> Completion | EventStream:
        prompt = _single_prompt(data.prompt)
        slot = registry.generation_slot(data.model)
        request = engine_request(data, slot.settings, max_tokens=data.max_tokens, prompt=prompt)
        stream = await dispatch.generate("completions", slot, request, record)
        cid, created, model = new_id("cmpl"), now(), data.model
        echo = prompt if data.echo and isinstance(prompt, str) else ""
        if not data.stream:
            text, finish_reason, usage = await collect(stream)
            choice = CompletionChoice(0, echo + text, finish_reason)
            return Completion(cid, created, model, [choice], usage)

        first = await first_chunk(stream)
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        events = event_stream(
            stream,
            first,
            opening=Completion(cid, created, model, [CompletionChoice(0, echo, None)]) if echo else None,
            piece=lambda text, finish: [Completion(cid, created, model, [CompletionChoice(0, text, finish)])],
            usage_event=(lambda u: Completion(cid, created, model, [], usage=u)) if include_usage else None,
            drain=dispatch.drain,
        )
        return EventStream(events)


def _single_prompt(prompt: str | list[Any]) -> str | list[int]:
    """One prompt per request: a string, a list of token ids, or a one-element list of either."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in prompt):
        return list(prompt)
    if all(isinstance(p, str) for p in prompt):
        raise InvalidRequestError("Only one prompt per request is supported", param="prompt")
    raise InvalidRequestError("prompt must be a string or a list of token ids", param="prompt")
