"""The Responses API's request side: input items (after a stored `previous_response_id` chain) as
the chat messages engines take, the request's tools as the functions a template is offered (and a
parsed call back as the item the client expects), the tool plan and the text format."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import msgspec

from backends.base import IMAGE_MARKER
from backends.tools import ToolCall
from kernel.errors import InvalidRequestError
from service.ids import new_id
from service.schemas.chat import FunctionSpec, ToolSpec
from service.schemas.common import JsonSchemaSpec, ResponseFormatSpec
from service.schemas.responses import (
    ContentPart,
    InputItem,
    NamedTool,
    OutputCustomToolCall,
    OutputFunctionCall,
    OutputItem,
    OutputLocalShellCall,
    ResponsesRequest,
    ShellAction,
    ToolDef,
)
from service.serving.images import ImagePart
from service.serving.tool_calls import ToolMode, ToolPlan, make_plan, tool_dicts

_Kind = Literal["function", "custom", "local_shell"]  # how a call comes back


class ResponseTools:
    """The request's tools as the functions a chat template is offered, and the way back from a
    parsed call to the item the client expects: a namespace's functions are offered as
    `<namespace>.<name>` and come back as `function_call` with `namespace`; a custom (freeform)
    tool takes one string `input` and comes back as `custom_tool_call`; `local_shell` takes the
    command's argv and comes back as `local_shell_call`. Hosted tools (web_search, file_search...)
    run on OpenAI's side: they are left out, as llama-server does."""

    def __init__(self, tools: Sequence[ToolDef]) -> None:
        self.specs: list[ToolSpec] = []
        self.kinds: dict[str, tuple[_Kind, str, str | None]] = {}  # offered name -> (kind, name, namespace)
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

    def _add(self, kind: _Kind, spec: FunctionSpec, namespace: str | None) -> None:
        inner = spec.name.removeprefix(f"{namespace}.") if namespace else spec.name
        self.kinds[spec.name] = (kind, inner, namespace)
        self.specs.append(ToolSpec(type="function", function=spec))

    def item(self, call: ToolCall) -> OutputItem:
        kind, name, namespace = self.kinds.get(call.name, ("function", call.name, None))
        if kind == "custom":
            return OutputCustomToolCall(new_id("ctc_"), new_id("call_"), name, _custom_input(call.arguments))
        if kind == "local_shell":
            return OutputLocalShellCall(new_id("lsh_"), new_id("call_"), _shell_action(call.arguments))
        return OutputFunctionCall(new_id("fc_"), new_id("call_"), name, call.arguments, namespace=namespace)


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


def tool_plan(data: ResponsesRequest, tools: ResponseTools) -> ToolPlan:
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


def response_format(data: ResponsesRequest) -> ResponseFormatSpec | None:
    if data.text is None or data.text.format.type == "text":
        return None
    fmt = data.text.format
    if fmt.type == "json_object":
        return ResponseFormatSpec(type="json_object")
    if fmt.schema is None:
        raise InvalidRequestError("text.format.schema is required for type json_schema", param="text.format.schema")
    spec = JsonSchemaSpec(name=fmt.name or "response", schema=fmt.schema, strict=fmt.strict)
    return ResponseFormatSpec(type="json_schema", json_schema=spec)


def _text(content: str | list[ContentPart] | None, param: str, images: list[ImagePart]) -> str:
    """A message's text, an IMAGE_MARKER for each image (added to `images`, in order)."""
    if content is None or isinstance(content, str):
        return content or ""
    for j, part in enumerate(content):
        if part.type == "input_image":
            if not part.image_url:
                raise InvalidRequestError(
                    "input_image needs image_url (file_id is not supported)", param=f"{param}[{j}]"
                )
            images.append(ImagePart(part.image_url, f"{param}[{j}]"))
        elif part.type not in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            raise InvalidRequestError(
                f"{part.type} content is not supported: this model reads text only, and answering without"
                " it would mislead",
                param=f"{param}[{j}]",
            )
    return "".join(IMAGE_MARKER if p.type == "input_image" else p.text or "" for p in content)


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


def prompt_messages(
    instructions: str | None, prior: list[InputItem], items: list[InputItem], tools: ResponseTools
) -> tuple[tuple[dict[str, Any], ...], list[ImagePart]]:
    """Instructions, a stored conversation and the input items as the OpenAI-shaped chat messages
    engines take (a previous response's instructions are not carried over, as on OpenAI), and
    their images in order."""
    images: list[ImagePart] = []
    out: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    numbered = [("previous_response_id", item) for item in prior]
    numbered += [(f"input[{i}]", item) for i, item in enumerate(items)]
    for param, item in numbered:
        if item.type == "message":
            if item.role is None:
                raise InvalidRequestError("A message item needs a role", param=f"{param}.role")
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": _text(item.content, f"{param}.content", images)})
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
            out.append(
                {"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output, f"{param}.output", images)}
            )
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
    return tuple(out), images


def stored_input(items: list[InputItem]) -> list[dict[str, Any]]:
    """This request's input items as `input_items` lists them: each with an id and a type, a
    message's text as content parts."""
    stored = []
    for item in items:
        entry: dict[str, Any] = msgspec.to_builtins(item)
        entry["type"] = item.type
        entry.setdefault("id", new_id(_ITEM_PREFIXES.get(item.type, "item") + "_"))
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


async def tools_echo(data: ResponsesRequest, body: Callable[[], Awaitable[bytes]]) -> list[dict[str, Any]]:
    """The tools as sent, for the response's `tools`: a hosted tool's own fields (a file search's
    `vector_store_ids`...) are not in our schema, so those come from the request's `body` itself."""
    if all(t.type in _OURS for t in data.tools or ()):
        return [msgspec.to_builtins(t) for t in data.tools or ()]
    return msgspec.json.decode(await body(), type=_ToolsOnly).tools or []
