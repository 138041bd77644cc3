"""Shared by chat and legacy completions: wire request → engine request, results and usage."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from typing import Any

import msgspec

from backends.base import Chunk, GenerationRequest, ResponseFormat, Token, Usage
from kernel.config import TierSettings
from kernel.errors import InvalidRequestError
from service.schemas.chat import (
    ChatCompletionRequest,
    ChatMessage,
    ChoiceLogprobs,
    NamedFunction,
    NamedToolChoice,
    ToolSpec,
)
from service.schemas.common import (
    PromptTokensDetails,
    ResponseFormatSpec,
    SamplingFields,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from service.schemas.completions import CompletionLogprobs
from service.serving.schema_limits import check_schema
from service.serving.thinking import ThinkingControl, thinking_control
from service.tiers.workers import ChunkStream


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def engine_request(
    fields: SamplingFields,
    tier: TierSettings,
    *,
    max_tokens: int | None,
    prompt: str | list[int] = "",
    messages: tuple[dict[str, Any], ...] | None = None,
    tools: tuple[dict[str, Any], ...] | None = None,
    constraint: ResponseFormat | None = None,
    logprobs: bool = False,
    top_logprobs: int = 0,
    prompt_logprobs: bool = False,
    adapter: str | None = None,
    thinking: ThinkingControl | None = None,
) -> GenerationRequest:
    """Apply the tier's defaults to whatever the request left out."""
    thinking = thinking or ThinkingControl()
    stop = (fields.stop,) if isinstance(fields.stop, str) else tuple(fields.stop or ())
    if len(stop) > 16:
        raise InvalidRequestError("At most 16 stop sequences are supported", param="stop")
    return GenerationRequest(
        prompt=prompt,
        messages=messages,
        tools=tools,
        max_tokens=max_tokens or tier.max_tokens,
        temperature=tier.temperature if fields.temperature is None else fields.temperature,
        top_p=tier.top_p if fields.top_p is None else fields.top_p,
        top_k=tier.top_k if fields.top_k is None else fields.top_k,
        min_p=tier.min_p if fields.min_p is None else fields.min_p,
        repeat_penalty=tier.repeat_penalty if fields.repeat_penalty is None else fields.repeat_penalty,
        presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        logit_bias=_logit_bias(fields.logit_bias),
        seed=fields.seed,
        stop=stop,
        response_format=constraint or _response_format(fields.response_format),
        logprobs=logprobs or top_logprobs > 0,
        top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs,
        adapter=adapter,
        thinking=thinking.enabled,
        thinking_budget=thinking.budget,
        template_kwargs=thinking.template_kwargs,
    )


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"<token id>": bias}; the engine checks the ids against its vocabulary."""
    try:
        return tuple((int(token), value) for token, value in (bias or {}).items())
    except ValueError:
        raise InvalidRequestError("logit_bias keys must be token ids", param="logit_bias") from None


def chat_logprobs(chunk: Chunk) -> ChoiceLogprobs | None:
    """A chunk's scored tokens in the chat shape (None when the request asked for no logprobs)."""
    if not chunk.scored:
        return None
    return ChoiceLogprobs(
        [
            TokenLogprob(
                t.logprob.token,
                t.logprob.logprob,
                list(t.logprob.token.encode()),
                [TopLogprob(a.token, a.logprob, list(a.token.encode())) for a in t.top_logprobs],
            )
            for t in chunk.scored
            if t.logprob is not None
        ]
    )


def completion_logprobs(scored: tuple[Token, ...], offset: int) -> CompletionLogprobs | None:
    """The legacy shape of scored tokens (a chunk's, or an echoed prompt's); `offset` is where
    their text starts in the whole answer. A prompt's first token has no logprob: null, as OpenAI's."""
    if not scored:
        return None
    tokens, offsets = [], []
    for t in scored:
        offsets.append(offset)
        tokens.append(t.logprob.token if t.logprob else t.text)
        offset += len(tokens[-1])
    return CompletionLogprobs(
        tokens,
        [t.logprob.logprob if t.logprob else None for t in scored],
        [{a.token: a.logprob for a in t.top_logprobs} if t.logprob else None for t in scored],
        offsets,
    )


def _response_format(spec: ResponseFormatSpec | None) -> ResponseFormat | None:
    if spec is None or spec.type == "text":
        return None
    if spec.type == "json_schema":
        if spec.json_schema is None or spec.json_schema.schema is None:
            raise InvalidRequestError(
                "response_format.json_schema.schema is required for type json_schema",
                param="response_format",
            )
        check_schema(spec.json_schema.schema, "response_format.json_schema.schema")
        return ResponseFormat("json_schema", spec.json_schema.schema)
    if spec.schema is not None:
        check_schema(spec.schema, "response_format.schema")
        return ResponseFormat("json_schema", spec.schema)
    return ResponseFormat("json_object")


def usage_info(usage: Usage) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


async def collect(stream: ChunkStream) -> tuple[Chunk, UsageInfo]:
    """Run a job to the end: one chunk holding the whole text, its scored tokens and the finish reason."""
    parts: list[str] = []
    scored: list[Token] = []
    prompt: tuple[Token, ...] = ()
    last = Chunk("")
    async for chunk in stream:
        parts.append(chunk.text)
        scored += chunk.scored
        prompt = prompt or chunk.prompt_scored
        last = chunk
    assert last.usage is not None  # a finished job's last chunk always carries usage
    whole = Chunk("".join(parts), last.finish_reason, last.usage, last.stop_sequence, tuple(scored), prompt)
    return whole, usage_info(last.usage)


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
            done, _ = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
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


async def first_chunk(stream: ChunkStream) -> Chunk:
    """Wait for the job to start producing, so prompt errors still become plain HTTP errors."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return Chunk("", finish_reason="stop", usage=Usage(0, 0))


def chat_messages(messages: list[ChatMessage]) -> tuple[dict[str, Any], ...]:
    """Wire messages as engines take them (OpenAI-shaped dicts, tool calls and results included).
    Our models read text only: an image, audio or file part is a 400 naming it, never dropped."""
    for i, message in enumerate(messages):
        if (j := message.unreadable_part()) is not None:
            kind = message.content[j].type if isinstance(message.content, list) else "?"
            raise InvalidRequestError(
                f"messages[{i}].content[{j}]: this model reads text only and cannot take a {kind!r} part",
                param=f"messages[{i}].content[{j}]",
            )
    return tuple(_message(m) for m in messages)


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
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
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
