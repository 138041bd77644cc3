"""Tool calling, engine-neutral: tools into the prompt, tool calls out of the model's text.

Templates that know tools (their source mentions `tools`, as Qwen's, Llama 3's, Mistral's do) get
the OpenAI tool list and the conversation's tool calls as Hugging Face templates expect them. For
templates that don't (the built-in Gemma one), the tools are described in the system message and
the model is asked for Hermes-style `<tool_call>{...}</tool_call>` blocks, which earlier turns
show too. Each format real models emit has a parser; a tier picks one by its template or
`{TIER}_TOOL_PARSER`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

ToolFormat = Literal["hermes", "llama3", "mistral"]
TOOL_FORMATS: tuple[ToolFormat, ...] = ("hermes", "llama3", "mistral")

# Where a tool call starts in streamed text, per format; llama3 emits bare JSON (or python_tag).
START_MARKERS: dict[ToolFormat, tuple[str, ...]] = {
    "hermes": ("<tool_call>",),
    "mistral": ("[TOOL_CALLS]",),
    "llama3": ("<|python_tag|>", "{"),
}


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def template_takes_tools(source: str | None) -> bool:
    return bool(source) and "tools" in (source or "")


def tool_format(source: str | None, setting: str = "auto") -> ToolFormat:
    """`{TIER}_TOOL_PARSER`, else the format the chat template writes, else Hermes (our built-in
    prompt, used for templates without tools)."""
    if setting != "auto":
        return setting  # type: ignore[return-value]  # the settings allow only TOOL_FORMATS
    text = (source or "") if template_takes_tools(source) else ""
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<|python_tag|>" in text or "ipython" in text:
        return "llama3"
    return "hermes"


def template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as Hugging Face templates expect them: tool-call arguments as objects, not JSON text."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [_template_call(call) for call in message["tool_calls"]]
        out.append(message)
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str) and isinstance(parsed := _loads(arguments), dict):
        function["arguments"] = parsed
    return {**call, "function": function}


def fold_tools(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For templates without tool support: tools described in the system message, earlier calls and
    results written as text in the Hermes format the model is asked to use. Without tools or tool
    turns, the messages come back as they were."""
    if not tools and not any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        return list(messages)
    out: list[dict[str, Any]] = []
    for message in messages:
        role, content = message.get("role"), message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n" + json.dumps(_call_object(c), ensure_ascii=False) + "\n</tool_call>"
                for c in message["tool_calls"]
            )
            out.append({"role": "assistant", "content": (content + "\n" + calls).strip()})
        elif role == "tool":
            text = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].endswith("</tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + text}  # several results, one turn
            else:
                out.append({"role": "user", "content": text})
        else:
            out.append({"role": role, "content": content})
    if not tools:
        return out
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + describe_tools(tools)}
    else:
        out.insert(0, {"role": "system", "content": describe_tools(tools)})
    return out


def describe_tools(tools: Sequence[dict[str, Any]]) -> str:
    signatures = "\n".join(json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools)
    return (
        "You may call one or more functions to assist with the user query. The functions are:\n"
        f"<tools>\n{signatures}\n</tools>\n"
        "To call a function, answer with a JSON object holding its name and arguments inside "
        '<tool_call></tool_call> tags, one per call:\n<tool_call>\n{"name": <function-name>, '
        '"arguments": <args-json-object>}\n</tool_call>'
    )


def _call_object(call: dict[str, Any]) -> dict[str, Any]:
    function = _template_call(call)["function"]
    return {"name": function.get("name"), "arguments": function.get("arguments")}


def forced_call_schema(tools: Sequence[dict[str, Any]], name: str | None) -> dict[str, Any]:
    """The JSON schema of one call to `name` (or to any of `tools`): what a grammar holds the model to
    for `tool_choice` "required" or a named function."""
    options = []
    for tool in tools:
        function = tool.get("function") or {}
        if name is not None and function.get("name") != name:
            continue
        parameters = function.get("parameters") or {"type": "object"}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": function.get("name")}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


# -- parsing -------------------------------------------------------------------------------------

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_forced(text: str) -> list[ToolCall]:
    """The output of a grammar-forced call: one JSON object {"name", "arguments"}."""
    return _calls_from(_loads(text))


def parse_tool_calls(text: str, fmt: ToolFormat) -> tuple[str, list[ToolCall]]:
    """Split a model's answer into its text and the tool calls it makes; text with no valid call
    comes back unchanged, with no calls."""
    if fmt == "hermes":
        calls = [c for block in _HERMES.findall(text) for c in _calls_from(_loads(block))]
        if calls:
            return text[: text.index("<tool_call>")].strip(), calls
        return text, []
    if fmt == "mistral":
        head, marker, tail = text.partition("[TOOL_CALLS]")
        calls = _calls_from(_loads(tail)) if marker else []
        return (head.strip(), calls) if calls else (text, [])
    body = text.strip().removeprefix("<|python_tag|>").strip()
    calls = [c for part in body.split(";") for c in _calls_from(_loads(part))] if body.startswith("{") else []
    return ("", calls) if calls else (text, [])


def _loads(text: str) -> Any:
    try:
        return json.loads(text.strip())
    except ValueError:
        return None


def _calls_from(value: Any) -> list[ToolCall]:
    """Calls from a decoded object or list of objects: {"name", "arguments" | "parameters"}."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):  # some models double-encode
            arguments = _loads(arguments)
        if not isinstance(arguments, dict):
            return []
        calls.append(ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls
