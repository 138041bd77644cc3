"""OpenAI's Responses API (`/v1/responses`) on the same generation path as chat: `instructions`
and input items (after a stored `previous_response_id` chain) become chat messages, the answer
comes back as output items (reasoning, message, function/custom/local-shell calls), streamed as
the typed `response.*` events; `store` keeps it (service.serving.response_store) for GET, DELETE,
`input_items` and continuation."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.params import Parameter

from backends.base import Chunk
from backends.tools import ToolCall
from kernel.errors import InvalidRequestError, LLMServiceError, NotFoundError
from service.metrics import RequestRecord
from service.schemas.chat import FunctionSpec, ToolSpec
from service.schemas.common import JsonSchemaSpec, ResponseFormatSpec, SamplingFields, UsageInfo
from service.schemas.responses import (
    ContentPart,
    DeletedResponse,
    IncompleteDetails,
    InputItem,
    InputItemList,
    InputTokensDetails,
    NamedTool,
    OutputCustomToolCall,
    OutputFunctionCall,
    OutputItem,
    OutputLocalShellCall,
    OutputMessage,
    OutputReasoning,
    OutputText,
    OutputTokensDetails,
    ReasoningText,
    Response,
    ResponsesRequest,
    ResponseUsage,
    ShellAction,
    SummaryText,
    ToolDef,
)
from service.serving.answer import Answer
from service.serving.generation import Generation, chat_logprobs, collect, engine_request, first_chunk, now, usage_info
from service.serving.response_store import ResponseStore
from service.serving.streaming import EventStream, event_stream, named_sse
from service.serving.thinking import thinking_control
from service.serving.tool_calls import ToolMode, ToolPlan, make_plan, tool_dicts
from service.tiers.registry import Registry

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


_STORED = {"errors": (404,)}  # `response_not_found`: never stored, deleted or evicted


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class ResponsesController(Controller):
    path = "/v1/responses"

    @post(status_code=200, summary="Create a model response (OpenAI Responses API)", opt={"stream_events": _STREAMED})
    async def create(
        self,
        data: ResponsesRequest,
        request: Request[Any, Any, Any],
        registry: Registry,
        generation: Generation,
        record: RequestRecord,
        responses: ResponseStore,
    ) -> Response | EventStream:
        _check_supported(data)
        target = generation.target(data.model, data.adapter)
        slot = target.slot
        tools = _Tools(data.tools or ())
        plan = _plan(data, tools)
        prior: list[InputItem] = []
        if data.previous_response_id is not None:
            try:
                context = responses.context(data.previous_response_id)
            except NotFoundError as exc:
                raise NotFoundError(exc.message, param="previous_response_id", code=exc.code) from None
            prior = msgspec.convert(context, list[InputItem])
        items = [InputItem(role="user", content=data.input)] if isinstance(data.input, str) else data.input
        fields = SamplingFields(
            model=data.model,
            temperature=data.temperature,
            top_p=data.top_p,
            seed=data.seed,
            response_format=_response_format(data),
        )
        # top_logprobs alone asks for them too: scores computed and not returned would be a silent drop.
        logprobs = "message.output_text.logprobs" in (data.include or ()) or bool(data.top_logprobs)
        effort = data.reasoning.effort if data.reasoning is not None else None
        generation_request = engine_request(
            fields,
            slot.settings,
            max_tokens=data.max_output_tokens,
            messages=_messages(data.instructions, prior, items, tools),
            tools=plan.tools,
            constraint=plan.forced,
            logprobs=logprobs,
            top_logprobs=data.top_logprobs or 0,
            adapter=target.adapter_name,
            thinking=thinking_control(effort=effort),
        )
        [stream] = await generation.generate("chat", target, generation_request, record)  # the same work as chat
        constrained = generation_request.response_format is not None
        answer = Answer(slot, plan, constrained=constrained, thinking=generation_request.thinking)
        store = data.store if data.store is not None else registry.settings.responses_store_default
        shell = _shell(data, await _tools_echo(request, data), slot.settings.temperature, slot.settings.top_p)
        asked = data.reasoning.summary or data.reasoning.generate_summary if data.reasoning is not None else None
        summarise = asked not in (None, "none")

        def finish(done: Response) -> Response:
            if not store:
                return done
            kept = msgspec.structs.replace(done, store=True)
            return kept if responses.keep(msgspec.to_builtins(kept), _stored_input(items)) else done

        if not data.stream:
            whole, usage = await collect(stream)
            parts, calls = answer.split(whole.text)
            output: list[OutputItem] = []
            if parts.reasoning:
                output.append(_reasoning(_id("rs"), parts.reasoning, summarise))
            if parts.content or not calls:
                text = OutputText(parts.content, logprobs=_logprobs(whole) if logprobs else [])
                cut = whole.finish_reason == "length" and not calls
                output.append(OutputMessage(_id("msg"), [text], "incomplete" if cut else "completed"))
            output += [tools.item(c) for c in calls[: data.max_tool_calls]]
            return finish(_finished(shell, output, whole, usage, bool(calls)))
        first = await first_chunk(stream)
        return EventStream(
            _events(generation, stream, first, shell, answer, logprobs, tools, data.max_tool_calls, summarise, finish)
        )

    @get("/{response_id:str}", summary="A stored response", opt=_STORED)
    async def retrieve(self, response_id: str, responses: ResponseStore) -> dict[str, Any]:
        return responses.get(response_id).response

    @delete("/{response_id:str}", status_code=200, summary="Delete a stored response", opt=_STORED)
    async def remove(self, response_id: str, responses: ResponseStore) -> DeletedResponse:
        responses.delete(response_id)
        return DeletedResponse(id=response_id)

    @get("/{response_id:str}/input_items", summary="A stored response's input items (a cursor page)", opt=_STORED)
    async def input_items(
        self,
        response_id: str,
        responses: ResponseStore,
        after: str | None = None,
        before: str | None = None,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        order: Literal["asc", "desc"] = "desc",
    ) -> InputItemList:
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


class _Tools:
    """The request's tools as the functions a chat template is offered, and the way back from a
    parsed call to the item the client expects: a namespace's functions are offered as
    `<namespace>.<name>` and come back as `function_call` with `namespace`; a custom (freeform)
    tool takes one string `input` and comes back as `custom_tool_call`; `local_shell` takes the
    command's argv and comes back as `local_shell_call`. Hosted tools (web_search, file_search...)
    run on OpenAI's side: they are left out, as llama-server does."""

    def __init__(self, tools: Sequence[ToolDef]) -> None:
        self.specs: list[ToolSpec] = []
        self.kinds: dict[str, tuple[str, str, str | None]] = {}  # offered name -> (kind, name, namespace)
        for i, tool in enumerate(tools):
            if tool.type == "function":
                self._add("function", _named(tool, f"tools[{i}]").function(), None)
            elif tool.type == "namespace":
                space = _named(tool, f"tools[{i}]").name
                for j, inner in enumerate(tool.tools or ()):
                    if inner.type != "function":
                        raise InvalidRequestError(
                            f"A namespace holds function tools, not {inner.type!r}", param=f"tools[{i}].tools[{j}]"
                        )
                    spec = _named(inner, f"tools[{i}].tools[{j}]").function(f"{space}.{inner.name}")
                    self._add("function", spec, space)
            elif tool.type == "custom":
                self._add("custom", _custom_spec(_named(tool, f"tools[{i}]")), None)
            elif tool.type == "local_shell":
                self._add("local_shell", _LOCAL_SHELL, None)

    def _add(self, kind: str, spec: FunctionSpec, namespace: str | None) -> None:
        inner = spec.name.removeprefix(f"{namespace}.") if namespace else spec.name
        self.kinds[spec.name] = (kind, inner, namespace)
        self.specs.append(ToolSpec(type="function", function=spec))

    def item(self, call: ToolCall) -> OutputItem:
        kind, name, namespace = self.kinds.get(call.name, ("function", call.name, None))
        if kind == "custom":
            return OutputCustomToolCall(_id("ctc"), _id("call"), name, _custom_input(call.arguments))
        if kind == "local_shell":
            return OutputLocalShellCall(_id("lsh"), _id("call"), _shell_action(call.arguments))
        return OutputFunctionCall(_id("fc"), _id("call"), name, call.arguments, namespace=namespace)


def _named(tool: ToolDef, param: str) -> ToolDef:
    if not tool.name:
        raise InvalidRequestError(f"A {tool.type} tool needs a name", param=f"{param}.name")
    return tool


_LOCAL_SHELL = FunctionSpec(
    name="local_shell",
    description="Run a command on the user's machine and see its output.",
    parameters={
        "type": "object",
        "properties": {
            "command": {"type": "array", "items": {"type": "string"}, "description": 'argv, e.g. ["ls", "-l"]'},
            "working_directory": {"type": "string"},
            "timeout_ms": {"type": "integer"},
        },
        "required": ["command"],
    },
)


def _custom_spec(tool: ToolDef) -> FunctionSpec:
    """A freeform tool as a function of one string; its grammar, which we cannot enforce on a
    JSON string, is shown to the model in the description."""
    fmt = tool.format or {}
    about = tool.description or ""
    if fmt.get("type") == "grammar":
        about += f"\nThe input must follow this {fmt.get('syntax', 'lark')} grammar:\n{fmt.get('definition', '')}"
    schema = {
        "type": "object",
        "properties": {"input": {"type": "string", "description": "The tool's input, as plain text"}},
        "required": ["input"],
    }
    assert tool.name is not None
    return FunctionSpec(name=tool.name, description=about.strip() or None, parameters=schema)


def _custom_input(arguments: str) -> str:
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    value = parsed.get("input") if isinstance(parsed, dict) else None
    return value if isinstance(value, str) else arguments


def _shell_action(arguments: str) -> ShellAction:
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = {}
    parsed = parsed if isinstance(parsed, dict) else {}
    command = parsed.get("command")
    if isinstance(command, str):
        command = ["bash", "-lc", command]
    argv = [str(c) for c in command] if isinstance(command, list) else []
    workdir, timeout = parsed.get("working_directory"), parsed.get("timeout_ms")
    return ShellAction(
        argv,
        working_directory=workdir if isinstance(workdir, str) else None,
        timeout_ms=timeout if isinstance(timeout, int) else None,
    )


def _plan(data: ResponsesRequest, tools: _Tools) -> ToolPlan:
    choice = data.tool_choice
    name = choice.name if isinstance(choice, NamedTool) else None
    mode: ToolMode = "named" if name is not None else (choice if isinstance(choice, str) else "auto")
    return make_plan(
        tool_dicts(tools.specs) if tools.specs else None,
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
    for j, part in enumerate(content):
        if part.type not in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            raise InvalidRequestError(
                f"{part.type} content is not supported: this model reads text only, and answering without"
                " it would mislead",
                param=f"{param}[{j}]",
            )
    return "".join(p.text or "" for p in content)


# Items that stay out of the prompt: earlier thinking (as reasoning models' templates do) and the
# calls of OpenAI's hosted tools, which this server never makes.
_SKIPPED = {"reasoning", "web_search_call", "file_search_call", "image_generation_call", "code_interpreter_call"}
_CALLS = {"function_call", "custom_tool_call", "local_shell_call"}
_OUTPUTS = {"function_call_output", "custom_tool_call_output", "local_shell_call_output"}


def _call_arguments(item: InputItem, param: str) -> tuple[str, str]:
    """A call item's (offered name, JSON arguments), as the model made it."""
    if item.type == "custom_tool_call":
        if not item.name or item.input is None:
            raise InvalidRequestError("A custom_tool_call item needs name and input", param=param)
        return item.name, json.dumps({"input": item.input})
    if item.type == "local_shell_call":
        command = (item.action or {}).get("command")
        return "local_shell", json.dumps({"command": command})
    if not item.name or item.arguments is None:
        raise InvalidRequestError("A function_call item needs call_id, name and arguments", param=param)
    return (f"{item.namespace}.{item.name}" if item.namespace else item.name), item.arguments


def _messages(
    instructions: str | None, prior: list[InputItem], items: list[InputItem], tools: _Tools
) -> tuple[dict[str, Any], ...]:
    """Instructions, a stored conversation and the input items as the OpenAI-shaped chat messages
    engines take (a previous response's instructions are not carried over, as on OpenAI)."""
    out: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    numbered = [("previous_response_id", item) for item in prior]
    numbered += [(f"input[{i}]", item) for i, item in enumerate(items)]
    for param, item in numbered:
        if item.type == "message":
            if item.role is None:
                raise InvalidRequestError("A message item needs a role", param=f"{param}.role")
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": _text(item.content, f"{param}.content")})
        elif item.type in _CALLS:
            if not item.call_id:
                raise InvalidRequestError(f"A {item.type} item needs call_id", param=f"{param}.call_id")
            name, arguments = _call_arguments(item, param)
            call = {"id": item.call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":  # several calls of one turn: one message
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif item.type in _OUTPUTS:
            if not item.call_id:
                raise InvalidRequestError(f"A {item.type} item needs call_id", param=f"{param}.call_id")
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output, f"{param}.output")})
        elif item.type == "item_reference":
            raise InvalidRequestError(
                "item_reference is not supported: continue a stored response with previous_response_id, or send"
                " the items themselves",
                param=param,
            )
        elif item.type not in _SKIPPED:
            raise InvalidRequestError(f"Input item type {item.type[:60]!r} is not supported", param=f"{param}.type")
    if not any(m["role"] != "system" for m in out):
        raise InvalidRequestError("input must contain at least one message", param="input")
    return tuple(out)


def _stored_input(items: list[InputItem]) -> list[dict[str, Any]]:
    """This request's input items as `input_items` lists them: each with an id and a type, a
    message's text as content parts."""
    stored = []
    for item in items:
        entry: dict[str, Any] = msgspec.to_builtins(item)
        entry["type"] = item.type
        entry.setdefault("id", _id(_ITEM_PREFIXES.get(item.type, "item")))
        if item.type == "message":
            if isinstance(item.content, str) or item.content is None:
                kind = "output_text" if item.role == "assistant" else "input_text"
                entry["content"] = [{"type": kind, "text": item.content or ""}]
            entry.setdefault("status", "completed")
        stored.append(entry)
    return stored


_ITEM_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


class _ToolsOnly(msgspec.Struct):
    tools: list[dict[str, Any]] | None = None


_OURS = {"function", "namespace", "custom", "local_shell"}


async def _tools_echo(request: Request[Any, Any, Any], data: ResponsesRequest) -> list[dict[str, Any]]:
    """The tools as sent, for the response's `tools`: a hosted tool's own fields (a file search's
    `vector_store_ids`...) are not in our schema, so those come from the body itself."""
    if all(t.type in _OURS for t in data.tools or ()):
        return [msgspec.to_builtins(t) for t in data.tools or ()]
    return msgspec.json.decode(await request.body(), type=_ToolsOnly).tools or []


def _shell(data: ResponsesRequest, tools: list[dict[str, Any]], temperature: float, top_p: float) -> Response:
    """The response as it stands before any output (echoing the request as OpenAI does)."""
    choice = data.tool_choice
    return Response(
        id=_id("resp"),
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
        temperature=temperature if data.temperature is None else data.temperature,
        top_p=top_p if data.top_p is None else data.top_p,
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


def _events(
    generation: Generation,
    stream: Any,
    first: Chunk,
    shell: Response,
    answer: Answer,
    logprobs: bool,
    tools: _Tools,
    max_calls: int | None,
    summarise: bool,
    finish: Callable[[Response], Response],
) -> Any:
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
            item: OutputItem = _reasoning(iid, text, summarise)
            output.append(item)
            done = [event("response.reasoning_text.done", item_id=iid, output_index=index, content_index=0, text=text)]
            if summarise:  # the summary is the whole thinking, sent as one delta once it is known
                at = {"item_id": iid, "output_index": index, "summary_index": 0}
                done += [
                    event("response.reasoning_summary_part.added", **at, part=SummaryText("")),
                    event("response.reasoning_summary_text.delta", **at, delta=text),
                    event("response.reasoning_summary_text.done", **at, text=text),
                    event("response.reasoning_summary_part.done", **at, part=SummaryText(text)),
                ]
            return [*done, event("response.output_item.done", output_index=index, item=item)]
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
            index, item = len(output), tools.item(call)
            output.append(item)
            if isinstance(item, OutputFunctionCall):
                opened: OutputItem = msgspec.structs.replace(item, arguments="", status="in_progress")
                body = [
                    event(
                        "response.function_call_arguments.delta",
                        item_id=item.id,
                        output_index=index,
                        delta=item.arguments,
                    ),
                    event(
                        "response.function_call_arguments.done",
                        item_id=item.id,
                        output_index=index,
                        name=item.name,
                        arguments=item.arguments,
                    ),
                ]
            elif isinstance(item, OutputCustomToolCall):
                opened = msgspec.structs.replace(item, input="", status="in_progress")
                body = [
                    event(
                        "response.custom_tool_call_input.delta", item_id=item.id, output_index=index, delta=item.input
                    ),
                    event(
                        "response.custom_tool_call_input.done", item_id=item.id, output_index=index, input=item.input
                    ),
                ]
            else:
                opened, body = msgspec.structs.replace(item, status="in_progress"), []
            events += [
                event("response.output_item.added", output_index=index, item=opened),
                *body,
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
        events += close() + calls_events(calls[:max_calls])
        assert part.usage is not None  # a finished job's last chunk carries usage
        done = finish(_finished(shell, output, part, usage_info(part.usage), bool(calls)))
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
        drain=generation.drain,
        frame=named_sse,
        error=error,
        done=b"",
    )
