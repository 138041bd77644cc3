"""OpenAI's Responses API (`POST /v1/responses`), stateless, on the same generation path as chat:
`instructions` and input items become chat messages, the answer comes back as output items
(reasoning, message, function calls), streamed as the typed `response.*` events."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from litestar import Controller, post

from backends.base import Chunk
from backends.tools import ToolCall
from kernel.errors import InvalidRequestError, LLMServiceError
from service.answer import Answer
from service.dispatch import Dispatcher
from service.generation import chat_logprobs, collect, engine_request, first_chunk, now, usage_info
from service.metrics import RequestRecord
from service.registry import Registry
from service.schemas.chat import ToolSpec
from service.schemas.common import JsonSchemaSpec, ResponseFormatSpec, SamplingFields, UsageInfo
from service.schemas.responses import (
    ContentPart,
    IncompleteDetails,
    InputItem,
    InputTokensDetails,
    NamedTool,
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
)
from service.streaming import EventStream, event_stream, named_sse
from service.tool_calls import ToolMode, ToolPlan, make_plan, tool_dicts

_STREAMED = (
    "With `stream: true`: the typed Responses events, each `event: <type>` and `data: <json>` with a "
    "`sequence_number`: response.created, response.in_progress, per output item response.output_item.added / "
    ".done with response.reasoning_text.delta / .done (thinking), response.content_part.added / .done and "
    "response.output_text.delta / .done (text), response.function_call_arguments.delta / .done (calls); then "
    "response.completed (or response.incomplete at max_output_tokens); an error after the start as `event: error`"
)
_INCLUDES = {
    "message.output_text.logprobs",  # logprobs on output_text parts (top_logprobs alternatives)
    # Asked by clients that do not store responses (Codex CLI): our reasoning items carry their
    # text in `content`, unencrypted, and reasoning items sent back stay out of the prompt.
    "reasoning.encrypted_content",
}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class ResponsesController(Controller):
    path = "/v1/responses"

    @post(status_code=200, summary="Create a model response (OpenAI Responses API)", opt={"stream_events": _STREAMED})
    async def create(
        self, data: ResponsesRequest, registry: Registry, dispatch: Dispatcher, record: RequestRecord
    ) -> Response | EventStream:
        _check_supported(data)
        slot, adapter = registry.generation_target(data.model, data.adapter)
        plan = _plan(data)
        fields = SamplingFields(
            model=data.model,
            temperature=data.temperature,
            top_p=data.top_p,
            seed=data.seed,
            response_format=_response_format(data),
        )
        # top_logprobs alone asks for them too: scores computed and not returned would be a silent drop.
        logprobs = "message.output_text.logprobs" in (data.include or ()) or bool(data.top_logprobs)
        request = engine_request(
            fields,
            slot.settings,
            max_tokens=data.max_output_tokens,
            messages=_messages(data),
            tools=plan.tools,
            constraint=plan.forced,
            logprobs=logprobs,
            top_logprobs=data.top_logprobs or 0,
            adapter=adapter,
        )
        stream = await dispatch.generate("chat", slot, request, record)  # the same work as chat: one cache
        answer = Answer(slot, plan, constrained=request.response_format is not None)
        shell = _shell(data, slot.settings.temperature, slot.settings.top_p)
        if not data.stream:
            whole, usage = await collect(stream)
            parts, calls = answer.split(whole.text)
            output: list[OutputItem] = []
            if parts.reasoning:
                output.append(OutputReasoning(_id("rs"), [ReasoningText(parts.reasoning)]))
            if parts.content or not calls:
                text = OutputText(parts.content, logprobs=_logprobs(whole) if logprobs else [])
                cut = whole.finish_reason == "length" and not calls
                output.append(OutputMessage(_id("msg"), [text], "incomplete" if cut else "completed"))
            output += [OutputFunctionCall(_id("fc"), _id("call"), c.name, c.arguments) for c in calls]
            return _finished(shell, output, whole, usage, bool(calls))
        first = await first_chunk(stream)
        return EventStream(_events(dispatch, stream, first, shell, answer, logprobs))


def _check_supported(data: ResponsesRequest) -> None:
    """Fields this stateless server cannot honour are refused by name, never dropped."""
    if data.previous_response_id is not None:
        raise InvalidRequestError(
            "previous_response_id is not supported: this server keeps no responses; send the whole conversation"
            " as input items",
            param="previous_response_id",
        )
    if data.store:
        raise InvalidRequestError("store is not supported: this server keeps no responses", param="store")
    if data.truncation == "auto":
        raise InvalidRequestError(
            "truncation 'auto' is not supported; input that does not fit is a 400", param="truncation"
        )
    if data.reasoning is not None and (data.reasoning.effort is not None or data.reasoning.summary is not None):
        raise InvalidRequestError(
            "reasoning.effort and reasoning.summary are not supported: the model's chat template decides whether it"
            " thinks, and its thinking comes back whole as a reasoning item",
            param="reasoning",
        )
    for name in data.include or ():
        if name not in _INCLUDES:
            raise InvalidRequestError(f"include {name!r} is not supported", param="include")


def _plan(data: ResponsesRequest) -> ToolPlan:
    specs = []
    for tool in data.tools or ():
        if tool.type != "function" or tool.name is None:
            raise InvalidRequestError(f"Tool type {tool.type!r} is not supported; only function tools", param="tools")
        specs.append(ToolSpec(type="function", function=tool.function()))
    choice = data.tool_choice
    name = choice.name if isinstance(choice, NamedTool) else None
    mode: ToolMode = "named" if name is not None else (choice if isinstance(choice, str) else "auto")
    return make_plan(
        tool_dicts(specs) if specs else None,
        mode,
        name,
        parallel=data.parallel_tool_calls is not False,
        constrained=data.text is not None and data.text.format.type != "text",
    )


def _response_format(data: ResponsesRequest) -> ResponseFormatSpec | None:
    if data.text is None or data.text.format.type == "text":
        return None
    fmt = data.text.format
    if fmt.type == "json_object":
        return ResponseFormatSpec(type="json_object")
    if fmt.schema is None:
        raise InvalidRequestError("text.format.schema is required for type json_schema", param="text.format.schema")
    spec = JsonSchemaSpec(name=fmt.name or "response", schema=fmt.schema, strict=fmt.strict)
    return ResponseFormatSpec(type="json_schema", json_schema=spec)


def _text(content: str | list[ContentPart] | None, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for part in content:
        if part.type not in ("input_text", "output_text", "text"):
            raise InvalidRequestError(f"{part.type} content is not supported; only text", param=param)
    return "".join(p.text or "" for p in content)


def _messages(data: ResponsesRequest) -> tuple[dict[str, Any], ...]:
    """Instructions and input items as the OpenAI-shaped chat messages engines take."""
    out: list[dict[str, Any]] = [{"role": "system", "content": data.instructions}] if data.instructions else []
    items = [InputItem(role="user", content=data.input)] if isinstance(data.input, str) else data.input
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if item.type == "message":
            if item.role is None:
                raise InvalidRequestError("A message item needs a role", param=f"{param}.role")
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": _text(item.content, f"{param}.content")})
        elif item.type == "function_call":
            if not item.call_id or not item.name or item.arguments is None:
                raise InvalidRequestError("A function_call item needs call_id, name and arguments", param=param)
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":  # several calls of one turn: one message
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif item.type == "function_call_output":
            if not item.call_id:
                raise InvalidRequestError("A function_call_output item needs call_id", param=f"{param}.call_id")
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output, f"{param}.output")})
        elif item.type == "item_reference":
            raise InvalidRequestError("item_reference is not supported: this server keeps no items", param=param)
        # reasoning items: earlier thinking stays out of the prompt, as reasoning models' templates do
    if not any(m["role"] != "system" for m in out):
        raise InvalidRequestError("input must contain at least one message", param="input")
    return tuple(out)


def _shell(data: ResponsesRequest, temperature: float, top_p: float) -> Response:
    """The response as it stands before any output (echoing the request as OpenAI does)."""
    choice = data.tool_choice
    return Response(
        id=_id("resp"),
        created_at=now(),
        model=data.model,
        status="in_progress",
        output=[],
        tools=[msgspec.structs.asdict(t) for t in data.tools or ()],
        tool_choice=choice if isinstance(choice, str) else (msgspec.structs.asdict(choice) if choice else "auto"),
        parallel_tool_calls=data.parallel_tool_calls is not False,
        text={"format": msgspec.structs.asdict(data.text.format) if data.text else {"type": "text"}},
        instructions=data.instructions,
        max_output_tokens=data.max_output_tokens,
        temperature=temperature if data.temperature is None else data.temperature,
        top_p=top_p if data.top_p is None else data.top_p,
        metadata=data.metadata or {},
        user=data.user,
    )


def _usage(usage: UsageInfo) -> ResponseUsage:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return ResponseUsage(
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        InputTokensDetails(cached),
        OutputTokensDetails(),
    )


def _finished(shell: Response, output: list[OutputItem], final: Chunk, usage: UsageInfo, called: bool) -> Response:
    cut = final.finish_reason == "length" and not called
    return msgspec.structs.replace(
        shell,
        status="incomplete" if cut else "completed",
        output=output,
        usage=_usage(usage),
        incomplete_details=IncompleteDetails("max_output_tokens") if cut else None,
    )


def _logprobs(chunk: Chunk) -> list[Any]:
    scored = chat_logprobs(chunk)
    return list(scored.content or []) if scored else []


def _events(dispatch: Dispatcher, stream: Any, first: Chunk, shell: Response, answer: Answer, logprobs: bool) -> Any:
    """The typed events: each output item added, filled by deltas, done; the response completed."""
    seq = iter(range(1 << 62))
    output: list[OutputItem] = []
    # The item being streamed: its kind ("reasoning" or "message"), id and text so far.
    current: dict[str, Any] = {"kind": None, "id": "", "text": [], "logprobs": [], "cut": False}

    def event(kind: str, **body: Any) -> dict[str, Any]:
        return {"type": kind, "sequence_number": next(seq), **body}

    def close() -> list[dict[str, Any]]:
        kind, iid, text = current["kind"], current["id"], "".join(current["text"])
        if kind is None:
            return []
        current["kind"] = None
        index = len(output)
        if kind == "reasoning":
            item: OutputItem = OutputReasoning(iid, [ReasoningText(text)])
            output.append(item)
            return [
                event("response.reasoning_text.done", item_id=iid, output_index=index, content_index=0, text=text),
                event("response.output_item.done", output_index=index, item=item),
            ]
        part = OutputText(text, logprobs=current["logprobs"])
        item = OutputMessage(iid, [part], "incomplete" if current["cut"] else "completed")
        output.append(item)
        return [
            event(
                "response.output_text.done",
                item_id=iid,
                output_index=index,
                content_index=0,
                text=text,
                logprobs=part.logprobs,
            ),
            event("response.content_part.done", item_id=iid, output_index=index, content_index=0, part=part),
            event("response.output_item.done", output_index=index, item=item),
        ]

    def write(kind: str, text: str, scored: list[Any]) -> list[dict[str, Any]]:
        events = []
        index = len(output)
        if current["kind"] != kind:
            events += close()
            index = len(output)
            iid = _id("rs" if kind == "reasoning" else "msg")
            current.update(kind=kind, id=iid, text=[], logprobs=[])
            if kind == "reasoning":
                item: OutputItem = OutputReasoning(iid, [], status="in_progress")
                events.append(event("response.output_item.added", output_index=index, item=item))
            else:
                item = OutputMessage(iid, [], status="in_progress")
                events += [
                    event("response.output_item.added", output_index=index, item=item),
                    event(
                        "response.content_part.added",
                        item_id=iid,
                        output_index=index,
                        content_index=0,
                        part=OutputText(""),
                    ),
                ]
        current["text"].append(text)
        current["logprobs"] += scored
        iid = current["id"]
        if kind == "reasoning":
            delta = event("response.reasoning_text.delta", item_id=iid, output_index=index, content_index=0, delta=text)
        else:
            delta = event(
                "response.output_text.delta",
                item_id=iid,
                output_index=index,
                content_index=0,
                delta=text,
                logprobs=scored,
            )
        return [*events, delta]

    def calls_events(calls: list[ToolCall]) -> list[dict[str, Any]]:
        events = []
        for call in calls:
            index, iid, call_id = len(output), _id("fc"), _id("call")
            opened = OutputFunctionCall(iid, call_id, call.name, "", status="in_progress")
            item = OutputFunctionCall(iid, call_id, call.name, call.arguments)
            output.append(item)
            events += [
                event("response.output_item.added", output_index=index, item=opened),
                event("response.function_call_arguments.delta", item_id=iid, output_index=index, delta=call.arguments),
                event(
                    "response.function_call_arguments.done",
                    item_id=iid,
                    output_index=index,
                    name=call.name,
                    arguments=call.arguments,
                ),
                event("response.output_item.done", output_index=index, item=item),
            ]
        return events

    def piece(part: Chunk) -> list[dict[str, Any]]:
        parts = answer.feed(part.text)
        scored = _logprobs(part) if logprobs else []
        events = write("reasoning", parts.reasoning, []) if parts.reasoning else []
        if parts.content or scored:
            events += write("message", parts.content, scored)
        if part.finish_reason is None:
            return events
        tail, calls = answer.finish()
        if tail.reasoning:
            events += write("reasoning", tail.reasoning, [])
        has_message = current["kind"] == "message" or any(isinstance(o, OutputMessage) for o in output)
        if tail.content or not (calls or has_message):
            events += write("message", tail.content, [])  # an answer without calls has a message, if empty
        current["cut"] = part.finish_reason == "length" and not calls  # the message stopped at max_output_tokens
        events += close() + calls_events(calls)
        assert part.usage is not None  # a finished job's last chunk carries usage
        done = _finished(shell, output, part, usage_info(part.usage), bool(calls))
        kind = "response.incomplete" if done.status == "incomplete" else "response.completed"
        return [*events, event(kind, response=done)]

    def error(exc: LLMServiceError) -> dict[str, Any]:
        return event("error", code=exc.code or exc.type, message=exc.message, param=exc.param)

    return event_stream(
        stream,
        first,
        opening=[event("response.created", response=shell), event("response.in_progress", response=shell)],
        piece=piece,
        usage_event=None,
        drain=dispatch.drain,
        frame=named_sse,
        error=error,
        done=b"",
    )
