"""OpenAI's Responses API (`/v1/responses`) on the same generation path as chat: `instructions`
and input items (after a stored `previous_response_id` chain) become chat messages
(service.serving.response_items), the answer comes back as output items (reasoning, message,
function/custom/local-shell calls), streamed as the typed `response.*` events; `store` keeps it
(service.serving.response_store) for GET, DELETE, `input_items` and continuation."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from litestar import Response as HttpResponse

from backends.base import Chunk
from backends.tools import ToolCall
from kernel.errors import InvalidRequestError, LLMServiceError, NotFoundError
from service.ids import new_id
from service.metrics import RequestRecord
from service.schemas.common import SamplingFields, TokenLogprob, UsageInfo
from service.schemas.responses import (
    IncompleteDetails,
    InputItem,
    InputItemList,
    InputTokensDetails,
    OutputCustomToolCall,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputText,
    OutputTokensDetails,
    ReasoningText,
    Response,
    ResponsesRequest,
    ResponseUsage,
    SummaryText,
)
from service.schemas.stream_events import (
    ArgumentsDelta,
    ArgumentsDone,
    ContentPartAdded,
    ContentPartDone,
    CustomInputDelta,
    CustomInputDone,
    OutputItemAdded,
    OutputItemDone,
    OutputTextDelta,
    OutputTextDone,
    ReasoningTextDelta,
    ReasoningTextDone,
    ResponseCompleted,
    ResponseCreated,
    ResponseError,
    ResponseEvent,
    ResponseIncomplete,
    ResponseInProgress,
    SummaryPartAdded,
    SummaryPartDone,
    SummaryTextDelta,
    SummaryTextDone,
    named_frame,
)
from service.serving.answer import Answer
from service.serving.generation import Generation, chat_logprobs, collect, engine_request, first_chunk, now, usage_info
from service.serving.images import check_images
from service.serving.passthrough import relay, relays
from service.serving.response_items import (
    ResponseTools,
    prompt_messages,
    response_format,
    stored_input,
    tool_plan,
    tools_echo,
)
from service.serving.response_store import ResponseStore
from service.serving.streaming import event_stream
from service.serving.thinking import thinking_control
from service.tiers.registry import Registry

_INCLUDES = {
    "message.output_text.logprobs",  # logprobs on output_text parts (top_logprobs alternatives)
    # Asked by clients that do not store responses (Codex CLI): our reasoning items carry their
    # text in `content`, unencrypted, and reasoning items sent back stay out of the prompt.
    "reasoning.encrypted_content",
}


async def create_response(
    data: ResponsesRequest,
    body: Callable[[], Awaitable[bytes]],
    generation: Generation,
    record: RequestRecord,
    responses: ResponseStore,
) -> Response | AsyncGenerator[bytes, None] | HttpResponse[Any]:
    """The whole response, or its SSE events once the job has started (so a prompt error is still
    a plain error); the upstream's own answer where the tier relays Responses (REMOTE_PASSTHROUGH).
    `body`: the request as sent, read to relay it or to echo hosted tools' own fields."""
    target = generation.target(data.model, data.adapter)
    if relays(target, "responses"):
        return await relay("responses", target, await body(), {}, generation, record, response_error)
    _check_supported(data)
    slot = target.slot
    tools = ResponseTools(data.tools or ())
    plan = tool_plan(data, tools)
    prior = _prior(responses, data.previous_response_id)
    items = [InputItem(role="user", content=data.input)] if isinstance(data.input, str) else data.input
    fields = SamplingFields(
        model=data.model,
        temperature=data.temperature,
        top_p=data.top_p,
        seed=data.seed,
        response_format=response_format(data),
        user=data.user,
        prompt_cache_key=data.prompt_cache_key,
    )
    # top_logprobs alone asks for them too: scores computed and not returned would be a silent drop.
    logprobs = "message.output_text.logprobs" in (data.include or ()) or bool(data.top_logprobs)
    messages, images = prompt_messages(data.instructions, prior, items, tools)
    check_images(messages, images, slot.settings)
    request = engine_request(
        fields,
        slot.settings,
        await generation.sampling(target, fields),
        max_tokens=data.max_output_tokens,
        messages=messages,
        images=await generation.images.load(images),
        tools=plan.tools,
        constraint=plan.forced,
        logprobs=logprobs,
        top_logprobs=data.top_logprobs or 0,
        adapter=target.adapter_name,
        thinking=thinking_control(effort=data.reasoning.effort if data.reasoning is not None else None),
    )
    [stream] = await generation.generate("chat", target, request, record)  # chat's work: one cache
    answer = Answer(slot, plan, constrained=request.response_format is not None, thinking=request.thinking)
    shell = _shell(data, await tools_echo(data, body), request.temperature, request.top_p)
    out = _Output(
        tools, data.max_tool_calls, _summarise(data), logprobs, _keeper(data, generation.registry, responses, items)
    )
    if not data.stream:
        whole, usage = await collect(stream)
        return out.whole(shell, answer, whole, usage)
    first = await first_chunk(stream)
    state = _ResponseStream(shell, answer, out)
    return event_stream(
        stream,
        first,
        opening=state.opening(),
        piece=state.piece,
        usage_event=None,
        drain=generation.drain,
        frame=named_frame,
        error=state.error,
        done=b"",
    )


def input_page(
    responses: ResponseStore,
    response_id: str,
    *,
    after: str | None,
    before: str | None,
    limit: int,
    order: Literal["asc", "desc"],
) -> InputItemList:
    """A stored response's input items as OpenAI's cursor page (newest first unless `asc`)."""
    items = list(responses.get(response_id).input)
    if order == "desc":
        items.reverse()
    ids = [item.get("id") for item in items]
    for cursor, param in ((after, "after"), (before, "before")):
        if cursor is not None and cursor not in ids:
            raise InvalidRequestError(f"No input item {cursor[:100]!r} in this response", param=param)
    start = ids.index(after) + 1 if after is not None else 0
    end = ids.index(before) if before is not None else len(items)
    page = items[start:end][:limit]
    return InputItemList(
        data=page,
        first_id=page[0]["id"] if page else None,
        last_id=page[-1]["id"] if page else None,
        has_more=start + len(page) < end,
    )


def _check_supported(data: ResponsesRequest) -> None:
    """Fields whose answer would mislead are refused by name; everything else is served."""
    if data.background:
        raise InvalidRequestError(
            "background is not supported: responses are answered in the request (use stream: true)",
            param="background",
        )
    if data.conversation is not None:
        raise InvalidRequestError(
            "conversation is not supported: this server has no Conversations API; continue with"
            " previous_response_id or send the whole conversation as input items",
            param="conversation",
        )
    if data.prompt is not None:
        raise InvalidRequestError(
            "prompt is not supported: prompt templates live on OpenAI's platform; send instructions", param="prompt"
        )
    for name in data.include or ():
        if name not in _INCLUDES:
            raise InvalidRequestError(f"include {name!r} is not supported", param="include")


def _prior(responses: ResponseStore, previous: str | None) -> list[InputItem]:
    """The stored conversation a continuation starts from (none without `previous_response_id`)."""
    if previous is None:
        return []
    try:
        context = responses.context(previous)
    except NotFoundError as exc:
        raise NotFoundError(exc.message, param="previous_response_id", code=exc.code) from None
    return msgspec.convert(context, list[InputItem])


def _summarise(data: ResponsesRequest) -> bool:
    asked = data.reasoning.summary or data.reasoning.generate_summary if data.reasoning is not None else None
    return asked not in (None, "none")


def _keeper(
    data: ResponsesRequest, registry: Registry, responses: ResponseStore, items: list[InputItem]
) -> Callable[[Response], Response]:
    """What becomes of a finished response: kept when `store` (RESPONSES_STORE_DEFAULT when not
    given) and it fits; the answer says `store: true` only when it was kept."""
    store = data.store if data.store is not None else registry.settings.responses_store_default

    def finish(done: Response) -> Response:
        if not store:
            return done
        kept = msgspec.structs.replace(done, store=True)
        return kept if responses.keep(msgspec.to_builtins(kept), stored_input(items)) else done

    return finish


def _shell(data: ResponsesRequest, tools: list[dict[str, object]], temperature: float, top_p: float) -> Response:
    """The response as it stands before any output (echoing the request as OpenAI does; temperature
    and top_p as sampled, the tier's defaults filled in)."""
    choice = data.tool_choice
    return Response(
        id=new_id("resp_"),
        created_at=now(),
        model=data.model,
        status="in_progress",
        output=[],
        tools=tools,
        tool_choice=choice if isinstance(choice, str) else (msgspec.structs.asdict(choice) if choice else "auto"),
        parallel_tool_calls=data.parallel_tool_calls is not False,
        text={"format": msgspec.structs.asdict(data.text.format) if data.text else {"type": "text"}},
        instructions=data.instructions,
        max_output_tokens=data.max_output_tokens,
        temperature=temperature,
        top_p=top_p,
        metadata=data.metadata or {},
        user=data.user,
        previous_response_id=data.previous_response_id,
        truncation=data.truncation or "disabled",
        reasoning=msgspec.to_builtins(data.reasoning) if data.reasoning else None,
        prompt_cache_key=data.prompt_cache_key,
        safety_identifier=data.safety_identifier,
        service_tier=data.service_tier,
    )


def _reasoning(iid: str, text: str, summarise: bool) -> OutputReasoning:
    """Thinking as `reasoning_text` content; asked for a summary (`reasoning.summary`), the summary
    is the thinking itself: there is no summariser, and clients such as Codex show only summaries."""
    return OutputReasoning(iid, [ReasoningText(text)], [SummaryText(text)] if summarise else [])


def _usage(usage: UsageInfo) -> ResponseUsage:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return ResponseUsage(
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        InputTokensDetails(cached, 0),
        OutputTokensDetails(),
    )


def _logprobs(chunk: Chunk) -> list[TokenLogprob]:
    scored = chat_logprobs(chunk)
    return list(scored.content or []) if scored else []


@dataclass(frozen=True, slots=True)
class _Output:
    """How the answer becomes output items, the same whether streamed or whole."""

    tools: ResponseTools
    max_calls: int | None
    summarise: bool
    logprobs: bool
    finish: Callable[[Response], Response]  # the finished response as answered (and stored)

    def whole(self, shell: Response, answer: Answer, whole: Chunk, usage: UsageInfo) -> Response:
        parts, calls = answer.split(whole.text)
        output: list[OutputItem] = []
        if parts.reasoning:
            output.append(_reasoning(new_id("rs_"), parts.reasoning, self.summarise))
        if parts.content or not calls:
            text = OutputText(parts.content, logprobs=_logprobs(whole) if self.logprobs else [])
            cut = whole.finish_reason == "length" and not calls
            output.append(OutputMessage(new_id("msg_"), [text], "incomplete" if cut else "completed"))
        output += [self.tools.item(c) for c in calls[: self.max_calls]]
        return self.done(shell, output, whole, usage, bool(calls))

    def done(self, shell: Response, output: list[OutputItem], final: Chunk, usage: UsageInfo, called: bool) -> Response:
        cut = final.finish_reason == "length" and not called
        return self.finish(
            msgspec.structs.replace(
                shell,
                status="incomplete" if cut else "completed",
                output=output,
                usage=_usage(usage),
                incomplete_details=IncompleteDetails("max_output_tokens") if cut else None,
            )
        )


@dataclass(slots=True)
class _Open:
    """The output item being streamed, and what it has said so far."""

    kind: Literal["reasoning", "message"]
    id: str
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class _ResponseStream:
    """A streamed response: each output item added, filled by deltas, done; then the response
    completed (or incomplete). Every event is numbered in the order it is made, which is the
    order it is sent."""

    shell: Response
    answer: Answer
    out: _Output
    output: list[OutputItem] = field(default_factory=list)  # the items done
    open: _Open | None = None
    sequence: int = 0

    def _next(self) -> int:
        self.sequence += 1
        return self.sequence - 1

    def opening(self) -> list[ResponseEvent]:
        return [ResponseCreated(self._next(), self.shell), ResponseInProgress(self._next(), self.shell)]

    def error(self, exc: LLMServiceError) -> ResponseError:
        return response_error(self._next(), exc)

    def piece(self, part: Chunk) -> list[ResponseEvent]:
        parts = self.answer.feed(part.text)
        scored = _logprobs(part) if self.out.logprobs else []
        events = self._write("reasoning", parts.reasoning, []) if parts.reasoning else []
        if parts.content or scored:
            events += self._write("message", parts.content, scored)
        return events if part.finish_reason is None else events + self._end(part)

    def _end(self, part: Chunk) -> list[ResponseEvent]:
        tail, calls = self.answer.finish()
        events = self._write("reasoning", tail.reasoning, []) if tail.reasoning else []
        said = (self.open is not None and self.open.kind == "message") or any(
            isinstance(o, OutputMessage) for o in self.output
        )
        if tail.content or not (calls or said):
            events += self._write("message", tail.content, [])  # an answer without calls has a message, if empty
        cut = part.finish_reason == "length" and not calls  # the message stopped at max_output_tokens
        events += self._close(cut)
        for call in calls[: self.out.max_calls]:
            events += self._call(call)
        assert part.usage is not None  # a finished job's last chunk carries usage
        done = self.out.done(self.shell, self.output, part, usage_info(part.usage), bool(calls))
        if done.status == "incomplete":
            return [*events, ResponseIncomplete(self._next(), done)]
        return [*events, ResponseCompleted(self._next(), done)]

    def _write(
        self, kind: Literal["reasoning", "message"], text: str, scored: list[TokenLogprob]
    ) -> list[ResponseEvent]:
        """`text` as a delta of an item of `kind`, opening one (and closing the last) if needed."""
        events = [] if self.open is not None and self.open.kind == kind else self._close() + self._start(kind)
        assert self.open is not None
        self.open.text.append(text)
        self.open.logprobs += scored
        iid, index = self.open.id, len(self.output)
        if kind == "reasoning":
            return [*events, ReasoningTextDelta(self._next(), iid, index, 0, text)]
        return [*events, OutputTextDelta(self._next(), iid, index, 0, text, scored)]

    def _start(self, kind: Literal["reasoning", "message"]) -> list[ResponseEvent]:
        index = len(self.output)
        if kind == "reasoning":
            self.open = _Open(kind, new_id("rs_"))
            return [OutputItemAdded(self._next(), index, OutputReasoning(self.open.id, [], status="in_progress"))]
        iid = new_id("msg_")
        self.open = _Open(kind, iid)
        return [
            OutputItemAdded(self._next(), index, OutputMessage(iid, [], status="in_progress")),
            ContentPartAdded(self._next(), iid, index, 0, OutputText("")),
        ]

    def _close(self, cut: bool = False) -> list[ResponseEvent]:
        """The open item done (`cut`: the message stopped at max_output_tokens)."""
        current, self.open = self.open, None
        if current is None:
            return []
        iid, text, index = current.id, "".join(current.text), len(self.output)
        if current.kind == "reasoning":
            reasoning = _reasoning(iid, text, self.out.summarise)
            self.output.append(reasoning)
            done = [ReasoningTextDone(self._next(), iid, index, 0, text), *self._summary(iid, index, text)]
            return [*done, OutputItemDone(self._next(), index, reasoning)]
        part = OutputText(text, logprobs=current.logprobs)
        message = OutputMessage(iid, [part], "incomplete" if cut else "completed")
        self.output.append(message)
        return [
            OutputTextDone(self._next(), iid, index, 0, text, part.logprobs),
            ContentPartDone(self._next(), iid, index, 0, part),
            OutputItemDone(self._next(), index, message),
        ]

    def _summary(self, iid: str, index: int, text: str) -> list[ResponseEvent]:
        """The summary is the whole thinking, sent as one delta once it is known."""
        if not self.out.summarise:
            return []
        return [
            SummaryPartAdded(self._next(), iid, index, 0, SummaryText("")),
            SummaryTextDelta(self._next(), iid, index, 0, text),
            SummaryTextDone(self._next(), iid, index, 0, text),
            SummaryPartDone(self._next(), iid, index, 0, SummaryText(text)),
        ]

    def _call(self, call: ToolCall) -> list[ResponseEvent]:
        """A tool call as an item added, its arguments (or freeform input) in one delta, done."""
        index, item = len(self.output), self.out.tools.item(call)
        self.output.append(item)
        if isinstance(item, OutputFunctionCall):
            opened = OutputItemAdded(
                self._next(), index, msgspec.structs.replace(item, arguments="", status="in_progress")
            )
            body: list[ResponseEvent] = [
                ArgumentsDelta(self._next(), item.id, index, item.arguments),
                ArgumentsDone(self._next(), item.id, index, item.name, item.arguments),
            ]
        elif isinstance(item, OutputCustomToolCall):
            opened = OutputItemAdded(self._next(), index, msgspec.structs.replace(item, input="", status="in_progress"))
            body = [
                CustomInputDelta(self._next(), item.id, index, item.input),
                CustomInputDone(self._next(), item.id, index, item.input),
            ]
        else:
            opened, body = OutputItemAdded(self._next(), index, msgspec.structs.replace(item, status="in_progress")), []
        return [opened, *body, OutputItemDone(self._next(), index, item)]


def response_error(sequence: int, exc: LLMServiceError) -> ResponseError:
    return ResponseError(sequence, exc.code or exc.type, exc.message, exc.param)
