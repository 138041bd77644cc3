"""Chat, legacy completions and their tokenizer, whatever carries them: HTTP (with SSE), the
WebSocket, batch lines, RAG chat. Thin adapters: the wire request becomes one engine request, goes
through `Generation`, and the engine's chunks come back in the wire format.

`serve_chat` and `serve_completion` return the whole answer, or a `Streamed` answer whose job has
started (so a prompt error is still a plain error, not an event). `background`: a batch-job line,
queued behind interactive requests (see service/tiers/workers.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

import msgspec

from backends.base import IMAGE_MARKER, Chunk, GenerationRequest, Token, Usage
from backends.tools import ToolCall
from kernel.config import TierSettings
from kernel.errors import InvalidRequestError
from service.ids import new_id
from service.metrics import RequestRecord
from service.schemas.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    ImageUrl,
    NamedFunction,
    NamedToolChoice,
    ToolSpec,
)
from service.schemas.common import UsageInfo
from service.schemas.completions import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from service.schemas.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizedImage,
    TokenizeRequest,
    TokenizeResponse,
)
from service.serving.answer import Answer
from service.serving.generation import (
    Generation,
    chat_logprobs,
    collect,
    engine_request,
    first_chunk,
    now,
)
from service.serving.images import ImagePart, check_images
from service.serving.streaming import Streamed
from service.serving.thinking import ThinkingControl, thinking_control
from service.serving.tool_calls import call_deltas, plan_tools, tool_dicts, wire_calls
from service.tiers.workers import ChunkStream

# -- chat ---------------------------------------------------------------------------------------


async def serve_chat(
    data: ChatCompletionRequest, generation: Generation, record: RequestRecord, *, background: bool = False
) -> ChatCompletion | Streamed:
    if not data.messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")
    target = generation.target(data.model, data.adapter)
    legacy = data.functions is not None or data.function_call is not None  # answered as `function_call`
    data = legacy_functions(data)
    tools = plan_tools(data)
    messages, images = chat_messages(data.messages, target.slot.settings)
    request = engine_request(
        data,
        target.slot.settings,
        await generation.sampling(target, data),
        max_tokens=data.max_completion_tokens or data.max_tokens,
        messages=messages,
        images=await generation.images.load(images),
        tools=tools.tools,
        constraint=tools.forced,
        logprobs=data.logprobs,
        top_logprobs=data.top_logprobs or 0,
        adapter=target.adapter_name,
        thinking=chat_thinking(data),
    )
    streams = await generation.generate("chat", target, request, record, n=data.n, background=background)
    # Made after generate() waited for the tier to load, which tells the model's formats.
    constrained = request.response_format is not None
    answers = [Answer(target.slot, tools, constrained=constrained, thinking=request.thinking) for _ in streams]
    reply = _ChatReply(new_id("chatcmpl-"), now(), data.model, legacy, answers)
    if not data.stream:
        return reply.whole(await collect_all(streams))
    return await reply.streamed(streams, include_usage=bool(data.stream_options and data.stream_options.include_usage))


@dataclass(slots=True)
class _ChatReply:
    """One chat answer: its id, and per choice the `Answer` that splits thinking and tool calls
    out of the model's text."""

    id: str
    created: int
    model: str
    legacy: bool  # asked with `functions`: calls go back as `function_call`
    answers: list[Answer]

    def whole(self, results: list[tuple[Chunk, UsageInfo]]) -> ChatCompletion:
        choices = [self._choice(index, whole) for index, (whole, _) in enumerate(results)]
        return ChatCompletion(self.id, self.created, self.model, choices, total_usage([u for _, u in results]))

    def _choice(self, index: int, whole: Chunk) -> ChatChoice:
        parts, found = self.answers[index].split(whole.text)
        calls = wire_calls(found)
        message = AssistantMessage(
            "assistant",
            parts.content or (None if found else ""),
            None if self.legacy else calls or None,
            reasoning_content=parts.reasoning or None,
            reasoning=parts.reasoning or None,
            function_call=calls[0].function if self.legacy and calls else None,
        )
        return ChatChoice(index, message, self._finish(found, whole.finish_reason), chat_logprobs(whole))

    def _finish(self, found: list[ToolCall], reason: str | None) -> str | None:
        return ("function_call" if self.legacy else "tool_calls") if found else reason

    async def streamed(self, streams: list[ChunkStream], *, include_usage: bool) -> Streamed:
        stream: ChunkStream = streams[0] if len(streams) == 1 else Fanout(streams)
        first = await first_chunk(stream)
        opening = [ChunkChoice(i, Delta(role="assistant", content="")) for i in range(len(streams))]
        return Streamed(
            stream,
            first,
            opening=[ChatCompletionChunk(self.id, self.created, self.model, opening)],
            piece=lambda part: self._piece(_index(stream), part),
            usage_event=self._usage if include_usage else None,
        )

    def _piece(self, index: int, part: Chunk) -> list[ChatCompletionChunk]:
        answer, logprobs = self.answers[index], chat_logprobs(part)
        parts = answer.feed(part.text)
        events = (
            [self._chunk(index, _delta(parts.reasoning, parts.content), logprobs=logprobs)] if parts or logprobs else []
        )
        if part.finish_reason is None:
            return events
        tail, found = answer.finish()
        if tail:
            events.append(self._chunk(index, _delta(tail.reasoning, tail.content)))
        for delta in call_deltas(wire_calls(found)):
            events.append(
                self._chunk(index, Delta(function_call=delta[0].function) if self.legacy else Delta(tool_calls=delta))
            )
        return [*events, self._chunk(index, Delta(), self._finish(found, part.finish_reason))]

    def _chunk(
        self, index: int, delta: Delta, finish: str | None = None, *, logprobs: ChoiceLogprobs | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(self.id, self.created, self.model, [ChunkChoice(index, delta, finish, logprobs)])

    def _usage(self, usage: UsageInfo) -> ChatCompletionChunk:
        return ChatCompletionChunk(self.id, self.created, self.model, [], usage=usage)


def _delta(reasoning: str, content: str) -> Delta:
    if not reasoning:
        return Delta(content=content) if content else Delta()
    return Delta(content=content or None, reasoning_content=reasoning, reasoning=reasoning)


def _index(stream: ChunkStream) -> int:
    """The choice the chunk last taken from `stream` belongs to."""
    return stream.index if isinstance(stream, Fanout) else 0


# -- legacy completions -------------------------------------------------------------------------


async def serve_completion(
    data: CompletionRequest, generation: Generation, record: RequestRecord, *, background: bool = False
) -> Completion | Streamed:
    if data.suffix:
        raise InvalidRequestError("suffix (fill-in-the-middle) is not supported", param="suffix")
    prompt = _single_prompt(data.prompt)
    target = generation.target(data.model, data.adapter)
    scored = data.logprobs is not None
    request = engine_request(
        data,
        target.slot.settings,
        await generation.sampling(target, data),
        max_tokens=data.max_tokens,
        prompt=prompt,
        logprobs=scored,
        top_logprobs=data.logprobs or 0,
        # OpenAI scores an echoed prompt's tokens too (echo repeats text prompts only).
        prompt_logprobs=scored and data.echo and isinstance(prompt, str),
        adapter=target.adapter_name,
    )
    streams = await generation.generate("completions", target, request, record, n=data.n, background=background)
    echo = prompt if data.echo and isinstance(prompt, str) else ""
    reply = _CompletionReply(new_id("cmpl-"), now(), data.model, echo, [len(echo)] * len(streams))
    if not data.stream:
        return reply.whole(await collect_all(streams))
    return await reply.streamed(streams, include_usage=bool(data.stream_options and data.stream_options.include_usage))


@dataclass(slots=True)
class _CompletionReply:
    """One legacy completion: its id, the echoed prompt, and per choice where its text has got to
    (the offsets of its logprobs)."""

    id: str
    created: int
    model: str
    echo: str
    offsets: list[int]

    def whole(self, results: list[tuple[Chunk, UsageInfo]]) -> Completion:
        choices = [
            CompletionChoice(
                index,
                self.echo + whole.text,
                whole.finish_reason,
                completion_logprobs(whole.prompt_scored + whole.scored, 0),
            )
            for index, (whole, _) in enumerate(results)
        ]
        return Completion(self.id, self.created, self.model, choices, total_usage([u for _, u in results]))

    async def streamed(self, streams: list[ChunkStream], *, include_usage: bool) -> Streamed:
        stream: ChunkStream = streams[0] if len(streams) == 1 else Fanout(streams)
        first = await first_chunk(stream)
        # The echoed prompt opens each choice, with its scores: the first chunk of every job
        # carries them, and only the first job's has arrived; the prompt is the same for all.
        prompt_logprobs = completion_logprobs(first.prompt_scored, 0)
        opening = [CompletionChoice(i, self.echo, None, prompt_logprobs) for i in range(len(streams))]
        return Streamed(
            stream,
            first,
            opening=[Completion(self.id, self.created, self.model, opening)] if self.echo else [],
            piece=lambda part: self._piece(_index(stream), part),
            usage_event=self._usage if include_usage else None,
        )

    def _piece(self, index: int, part: Chunk) -> list[Completion]:
        logprobs = completion_logprobs(part.scored, self.offsets[index])
        self.offsets[index] += len(part.text)
        choice = CompletionChoice(index, part.text, part.finish_reason, logprobs)
        return [Completion(self.id, self.created, self.model, [choice])]

    def _usage(self, usage: UsageInfo) -> Completion:
        return Completion(self.id, self.created, self.model, [], usage=usage)


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


# -- the tokenizer --------------------------------------------------------------------------------


async def serve_tokenize(data: TokenizeRequest, generation: Generation) -> TokenizeResponse:
    """The prompt's tokens as chat (`messages`) or completions (`prompt`) would see them."""
    if (data.prompt is None) == (data.messages is None):
        raise InvalidRequestError("Send either prompt or messages", param="prompt")
    target = generation.target(data.model)
    messages, images = chat_messages(data.messages, target.slot.settings) if data.messages is not None else (None, [])
    request = GenerationRequest(
        prompt=data.prompt or "",
        messages=messages,
        images=await generation.images.load(images),
        tools=tool_dicts(data.tools) if data.tools else None,
    )
    tokens = await generation.tokens(target, request)
    # An image's places hold no vocabulary id (llama.cpp's are negative keys, MLX's a placeholder):
    # `tokens` lists the ids around them, `images` where each image goes and how many places it takes.
    ids: list[int] = []
    places: list[TokenizedImage] = []
    at = 0
    for span in tokens.images:
        ids.extend(tokens.ids[at : span.start])
        places.append(TokenizedImage(span.index, len(ids), span.length))
        at = span.start + span.length
    ids.extend(tokens.ids[at:])
    return TokenizeResponse(ids, len(tokens.ids), tokens.context, places)


async def serve_detokenize(data: DetokenizeRequest, generation: Generation) -> DetokenizeResponse:
    return DetokenizeResponse(await generation.detokenize(data.model, data.tokens))


# -- shared by chat and completions ---------------------------------------------------------------


def completion_logprobs(scored: tuple[Token, ...], offset: int) -> CompletionLogprobs | None:
    """The legacy shape of scored tokens (a chunk's, or an echoed prompt's); `offset` is where
    their text starts in the whole answer. A prompt's first token has no logprob: null, as OpenAI's."""
    if not scored:
        return None
    tokens, offsets = [], []
    for t in scored:
        offsets.append(offset)
        tokens.append(t.logprob.token if t.logprob else t.text)
        offset += len(t.text)  # a byte token's text comes with the token that completes its character
    return CompletionLogprobs(
        tokens,
        [t.logprob.logprob if t.logprob else None for t in scored],
        [{a.token: a.logprob for a in t.top_logprobs} if t.logprob else None for t in scored],
        offsets,
    )


async def collect_all(streams: list[ChunkStream]) -> list[tuple[Chunk, UsageInfo]]:
    """Every choice's whole answer (see `collect`), run side by side."""
    try:
        return await asyncio.gather(*(collect(s) for s in streams))
    finally:
        for stream in streams:
            stream.cancel()  # a no-op for finished jobs; stops the others when one failed


def total_usage(usages: list[UsageInfo]) -> UsageInfo:
    """Usage of several choices of one prompt: the prompt counts once, generated tokens add up."""
    first = usages[0]
    completion = sum(u.completion_tokens for u in usages)
    return UsageInfo(first.prompt_tokens, completion, first.prompt_tokens + completion, first.prompt_tokens_details)


class Fanout:
    """Several choices' streams as one: chunks in the order they come, `index` naming the choice
    of the chunk last returned. Each job's usage is held back and summed into one last chunk."""

    def __init__(self, streams: list[ChunkStream]) -> None:
        self._streams = streams
        self._pending: dict[asyncio.Future[Chunk | None], int] = {}
        self._usages: list[Usage] = []
        self._started = False
        self.index = 0

    def __aiter__(self) -> Fanout:
        return self

    async def __anext__(self) -> Chunk:
        if not self._started:
            self._started = True
            for i in range(len(self._streams)):
                self._watch(i)
        while self._pending:
            try:
                done, _ = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:  # interrupted (the client went away): every choice's job stops
                self.cancel()
                raise
            task = done.pop()
            index = self._pending.pop(task)
            chunk = task.result()  # a job's error ends the whole stream (cancel() stops the rest)
            if chunk is None:
                continue
            self._watch(index)
            self.index = index
            if chunk.usage is None:
                return chunk
            self._usages.append(chunk.usage)
            return replace(chunk, usage=None)
        if self._usages:
            usages, self._usages = self._usages, []
            total = Usage(
                usages[0].prompt_tokens,
                sum(u.completion_tokens for u in usages),
                cached_tokens=usages[0].cached_tokens,
            )
            return Chunk("", usage=total)
        raise StopAsyncIteration

    def _watch(self, index: int) -> None:
        self._pending[asyncio.ensure_future(anext(self._streams[index], None))] = index

    def cancel(self) -> None:
        for task in self._pending:
            task.cancel()
        for stream in self._streams:
            stream.cancel()


def chat_messages(
    messages: list[ChatMessage], tier: TierSettings
) -> tuple[tuple[dict[str, Any], ...], list[ImagePart]]:
    """Wire messages as engines take them (OpenAI-shaped dicts, tool calls and results included),
    and their images in order, each an IMAGE_MARKER in its message's text. An image to a text-only
    tier, or an audio or file part, is a 400 naming it, never dropped."""
    images: list[ImagePart] = []
    for i, message in enumerate(messages):
        if (j := message.unreadable_part()) is not None:
            kind = message.content[j].type if isinstance(message.content, list) else "?"
            raise InvalidRequestError(
                f"messages[{i}].content[{j}]: this model reads text and images only and cannot take a {kind!r} part",
                param=f"messages[{i}].content[{j}]",
            )
        for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
            if part.type == "image_url":
                url = part.image_url.url if isinstance(part.image_url, ImageUrl) else part.image_url
                if not url:
                    raise InvalidRequestError(
                        f"messages[{i}].content[{j}].image_url.url is required", param=f"messages[{i}].content[{j}]"
                    )
                images.append(ImagePart(url, f"messages[{i}].content[{j}]"))
    out = tuple(_message(m) for m in messages)
    check_images(out, images, tier)
    return out, images


def legacy_functions(data: ChatCompletionRequest) -> ChatCompletionRequest:
    """Function calling from before `tools` (`functions`, `function_call`) as tools and a tool
    choice; the answer then carries `message.function_call` (see `serve_chat`). One call at a time,
    as that API had."""
    if data.functions is None and data.function_call is None:
        return data
    if data.tools is not None:
        raise InvalidRequestError("Send either tools or the legacy functions, not both", param="functions")
    choice = data.function_call
    named = NamedToolChoice(type="function", function=choice) if isinstance(choice, NamedFunction) else None
    return msgspec.structs.replace(
        data,
        tools=[ToolSpec(type="function", function=f) for f in data.functions] if data.functions else None,
        tool_choice=named or (choice if isinstance(choice, str) else None),
        parallel_tool_calls=False,
    )


def chat_thinking(data: ChatCompletionRequest) -> ThinkingControl:
    """Chat's reasoning controls (`reasoning_effort`, `chat_template_kwargs`) as one control; the
    fields chat refuses (output a text model cannot make) fail here."""
    if data.modalities and (other := [m for m in data.modalities if m != "text"]):
        raise InvalidRequestError(f"modalities: this model answers in text only, not {other[0]!r}", param="modalities")
    if data.audio is not None:
        raise InvalidRequestError("audio: this model cannot answer with audio", param="audio")
    return thinking_control(effort=data.reasoning_effort, template_kwargs=data.chat_template_kwargs)


def _message(message: ChatMessage) -> dict[str, Any]:
    # OpenAI's newer "developer" role is the system role for every chat template we know.
    text = message.text()
    if isinstance(message.content, list) and any(p.type == "image_url" for p in message.content):
        text = "".join(
            IMAGE_MARKER if p.type == "image_url" else (p.text if p.type == "text" else p.refusal) or ""
            for p in message.content
        )
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": text}
    if message.tool_calls:
        out["tool_calls"] = [
            msgspec.structs.asdict(c) | {"function": msgspec.structs.asdict(c.function)} for c in message.tool_calls
        ]
    elif message.function_call is not None:  # the legacy form of an assistant's call
        call = msgspec.structs.asdict(message.function_call)
        out["tool_calls"] = [{"id": f"call_{call['name']}", "type": "function", "function": call}]
    if message.role == "function":  # the legacy form of a tool result: templates know "tool"
        out["role"] = "tool"
        out.setdefault("tool_call_id", f"call_{message.name}")
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out
