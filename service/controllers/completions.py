from __future__ import annotations

from typing import Any

from litestar import Controller, post

from backends.base import Chunk
from kernel.errors import InvalidRequestError
from service.dispatch import Dispatcher
from service.generation import (
    Fanout,
    collect_all,
    completion_logprobs,
    engine_request,
    first_chunk,
    new_id,
    now,
    total_usage,
)
from service.metrics import RequestRecord
from service.registry import Registry
from service.schemas.completions import Completion, CompletionChoice, CompletionRequest
from service.streaming import EventStream, event_stream
from service.workers import ChunkStream


class CompletionsController(Controller):
    path = "/v1/completions"

    @post(status_code=200, summary="Create a completion (legacy)", opt={"stream_events": Completion})
    async def create(
        self, data: CompletionRequest, registry: Registry, dispatch: Dispatcher, record: RequestRecord
    ) -> Completion | EventStream:
        if data.suffix:
            raise InvalidRequestError("suffix (fill-in-the-middle) is not supported", param="suffix")
        prompt = _single_prompt(data.prompt)
        slot = registry.generation_slot(data.model)
        scored = data.logprobs is not None
        request = engine_request(
            data,
            slot.settings,
            max_tokens=data.max_tokens,
            prompt=prompt,
            logprobs=scored,
            top_logprobs=data.logprobs or 0,
            # OpenAI scores an echoed prompt's tokens too (echo repeats text prompts only).
            prompt_logprobs=scored and data.echo and isinstance(prompt, str),
        )
        streams = await dispatch.choices("completions", slot, request, record, data.n)
        cid, created, model = new_id("cmpl"), now(), data.model
        echo = prompt if data.echo and isinstance(prompt, str) else ""
        if not data.stream:
            choices, usages = [], []
            for index, (whole, usage) in enumerate(await collect_all(streams)):
                logprobs = completion_logprobs(whole.prompt_scored + whole.scored, 0)
                choices.append(CompletionChoice(index, echo + whole.text, whole.finish_reason, logprobs))
                usages.append(usage)
            return Completion(cid, created, model, choices, total_usage(usages))

        stream: ChunkStream = streams[0] if len(streams) == 1 else Fanout(streams)
        first = await first_chunk(stream)
        offsets = [len(echo)] * len(streams)

        def piece(part: Chunk) -> list[Completion]:
            index = stream.index if isinstance(stream, Fanout) else 0
            logprobs = completion_logprobs(part.scored, offsets[index])
            choice = CompletionChoice(index, part.text, part.finish_reason, logprobs)
            offsets[index] += len(part.text)
            return [Completion(cid, created, model, [choice])]

        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        # The echoed prompt opens each choice, with its scores: the first chunk of every job
        # carries them, and only the first job's has arrived; the prompt is the same for all.
        prompt_logprobs = completion_logprobs(first.prompt_scored, 0)
        opening = [CompletionChoice(i, echo, None, prompt_logprobs) for i in range(len(streams))]
        events = event_stream(
            stream,
            first,
            opening=[Completion(cid, created, model, opening)] if echo else [],
            piece=piece,
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
