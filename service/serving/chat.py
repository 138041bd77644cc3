"""Chat and legacy completions, whatever carries them: HTTP (with SSE) or the WebSocket.

Each function takes the decoded request and returns the whole answer, or a `Streamed` answer
whose job has started (so a prompt error is still a plain error, not an event). `background`: a
batch-job line, queued behind interactive requests (see service/tiers/workers.py)."""

from __future__ import annotations

from typing import Any

from backends.base import Chunk
from kernel.errors import InvalidRequestError
from service.metrics import RequestRecord
from service.schemas.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
)
from service.schemas.completions import Completion, CompletionChoice, CompletionRequest
from service.serving.answer import Answer
from service.serving.dispatch import Dispatcher
from service.serving.generation import (
    Fanout,
    chat_logprobs,
    chat_messages,
    chat_thinking,
    collect_all,
    completion_logprobs,
    engine_request,
    first_chunk,
    legacy_functions,
    new_id,
    now,
    total_usage,
)
from service.serving.streaming import Streamed
from service.serving.tool_calls import call_deltas, plan_tools, wire_calls
from service.tiers.registry import Registry
from service.tiers.workers import ChunkStream


async def serve_chat(
    data: ChatCompletionRequest,
    registry: Registry,
    dispatch: Dispatcher,
    record: RequestRecord,
    *,
    background: bool = False,
) -> ChatCompletion | Streamed:
    if not data.messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")
    slot, adapter = registry.generation_target(data.model, data.adapter)
    legacy = data.functions is not None or data.function_call is not None  # answered as `function_call`
    data = legacy_functions(data)
    tools = plan_tools(data)
    request = engine_request(
        data,
        slot.settings,
        max_tokens=data.max_completion_tokens or data.max_tokens,
        messages=chat_messages(data.messages),
        tools=tools.tools,
        constraint=tools.forced,
        logprobs=data.logprobs,
        top_logprobs=data.top_logprobs or 0,
        adapter=adapter,
        thinking=chat_thinking(data),
    )
    streams = await dispatch.choices("chat", slot, request, record, data.n, background=background)
    cid, created, model = new_id("chatcmpl"), now(), data.model
    # Made after generate() waited for the tier to load, which tells the model's formats.
    constrained = request.response_format is not None
    answers = [Answer(slot, tools, constrained=constrained, thinking=request.thinking) for _ in streams]
    if not data.stream:
        choices, usages = [], []
        for index, (answer, (whole, usage)) in enumerate(zip(answers, await collect_all(streams), strict=True)):
            parts, found = answer.split(whole.text)
            calls = wire_calls(found)
            message = AssistantMessage(
                "assistant",
                parts.content or (None if found else ""),
                None if legacy else calls or None,
                reasoning_content=parts.reasoning or None,
                reasoning=parts.reasoning or None,
                function_call=calls[0].function if legacy and calls else None,
            )
            finish = ("function_call" if legacy else "tool_calls") if found else whole.finish_reason
            choices.append(ChatChoice(index, message, finish, chat_logprobs(whole)))
            usages.append(usage)
        return ChatCompletion(cid, created, model, choices, total_usage(usages))

    stream: ChunkStream = streams[0] if len(streams) == 1 else Fanout(streams)
    first = await first_chunk(stream)

    def chunk(
        index: int, delta: Delta, finish: str | None = None, logprobs: ChoiceLogprobs | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(cid, created, model, [ChunkChoice(index, delta, finish, logprobs)])

    def piece(part: Chunk) -> list[ChatCompletionChunk]:
        index = stream.index if isinstance(stream, Fanout) else 0
        answer, logprobs = answers[index], chat_logprobs(part)
        parts = answer.feed(part.text)
        events = [chunk(index, _delta(parts.reasoning, parts.content), None, logprobs)] if parts or logprobs else []
        if part.finish_reason is None:
            return events
        tail, found = answer.finish()
        if tail:
            events.append(chunk(index, _delta(tail.reasoning, tail.content)))
        deltas = call_deltas(wire_calls(found))
        if legacy:
            events += [chunk(index, Delta(function_call=delta[0].function)) for delta in deltas]
        else:
            events += [chunk(index, Delta(tool_calls=delta)) for delta in deltas]
        finish = ("function_call" if legacy else "tool_calls") if found else part.finish_reason
        return [*events, chunk(index, Delta(), finish)]

    include_usage = bool(data.stream_options and data.stream_options.include_usage)
    opening = [ChunkChoice(i, Delta(role="assistant", content="")) for i in range(len(streams))]
    return Streamed(
        stream,
        first,
        opening=[ChatCompletionChunk(cid, created, model, opening)],
        piece=piece,
        usage_event=(lambda u: ChatCompletionChunk(cid, created, model, [], usage=u)) if include_usage else None,
    )


def _delta(reasoning: str, content: str) -> Delta:
    if not reasoning:
        return Delta(content=content) if content else Delta()
    return Delta(content=content or None, reasoning_content=reasoning, reasoning=reasoning)


async def serve_completion(
    data: CompletionRequest,
    registry: Registry,
    dispatch: Dispatcher,
    record: RequestRecord,
    *,
    background: bool = False,
) -> Completion | Streamed:
    if data.suffix:
        raise InvalidRequestError("suffix (fill-in-the-middle) is not supported", param="suffix")
    prompt = _single_prompt(data.prompt)
    slot, adapter = registry.generation_target(data.model, data.adapter)
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
        adapter=adapter,
    )
    streams = await dispatch.choices("completions", slot, request, record, data.n, background=background)
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
    return Streamed(
        stream,
        first,
        opening=[Completion(cid, created, model, opening)] if echo else [],
        piece=piece,
        usage_event=(lambda u: Completion(cid, created, model, [], usage=u)) if include_usage else None,
    )


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
