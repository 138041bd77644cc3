from __future__ import annotations

from litestar import Controller, post

from backends.base import Chunk
from kernel.errors import InvalidRequestError
from service.answer import Answer
from service.dispatch import Dispatcher
from service.generation import (
    Fanout,
    chat_logprobs,
    chat_messages,
    collect_all,
    engine_request,
    first_chunk,
    new_id,
    now,
    total_usage,
)
from service.metrics import RequestRecord
from service.registry import Registry
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
from service.streaming import EventStream, event_stream
from service.tool_calls import call_deltas, plan_tools, wire_calls
from service.workers import ChunkStream


class ChatController(Controller):
    path = "/v1/chat/completions"

    @post(status_code=200, summary="Create a chat completion", opt={"stream_events": ChatCompletionChunk})
    async def create(
        self, data: ChatCompletionRequest, registry: Registry, dispatch: Dispatcher, record: RequestRecord
    ) -> ChatCompletion | EventStream:
        if not data.messages:
            raise InvalidRequestError("messages must contain at least one message", param="messages")
        slot = registry.generation_slot(data.model)
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
        )
        streams = await dispatch.choices("chat", slot, request, record, data.n)
        cid, created, model = new_id("chatcmpl"), now(), data.model
        # Made after generate() waited for the tier to load, which tells the model's formats.
        answers = [Answer(slot, tools, constrained=request.response_format is not None) for _ in streams]
        if not data.stream:
            choices, usages = [], []
            for index, (answer, (whole, usage)) in enumerate(zip(answers, await collect_all(streams), strict=True)):
                parts, found = answer.split(whole.text)
                message = AssistantMessage(
                    "assistant",
                    parts.content or (None if found else ""),
                    wire_calls(found) or None,
                    reasoning_content=parts.reasoning or None,
                    reasoning=parts.reasoning or None,
                )
                finish = "tool_calls" if found else whole.finish_reason
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
            events += [chunk(index, Delta(tool_calls=delta)) for delta in call_deltas(wire_calls(found))]
            return [*events, chunk(index, Delta(), "tool_calls" if found else part.finish_reason)]

        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        opening = [ChunkChoice(i, Delta(role="assistant", content="")) for i in range(len(streams))]
        events = event_stream(
            stream,
            first,
            opening=[ChatCompletionChunk(cid, created, model, opening)],
            piece=piece,
            usage_event=(lambda u: ChatCompletionChunk(cid, created, model, [], usage=u)) if include_usage else None,
            drain=dispatch.drain,
        )
        return EventStream(events)


def _delta(reasoning: str, content: str) -> Delta:
    if not reasoning:
        return Delta(content=content) if content else Delta()
    return Delta(content=content or None, reasoning_content=reasoning, reasoning=reasoning)
