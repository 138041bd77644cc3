"""Reasoning controls of the four APIs mapped onto what a model has: its chat template's thinking
switch (`enable_thinking` for Qwen3-style templates, `thinking` for DeepSeek-V3.1, a
`reasoning_effort` level for gpt-oss) and a budget of thinking tokens that the engine enforces
while decoding (it closes the block when the budget is spent).

chat `reasoning_effort` / `chat_template_kwargs`, Responses `reasoning.effort`, Messages
`thinking` (`enabled` + `budget_tokens`, `adaptive`, `disabled`) and `output_config.effort` all
come through `thinking_control`. A model that does not think ignores them: effort is a hint there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from backends.base import RESERVED_TEMPLATE_NAMES
from kernel.errors import InvalidRequestError

# Thinking tokens allowed per effort level (OpenAI's names and Anthropic's); levels above `high`
# and names newer than this table leave the budget to `max_tokens`.
EFFORT_BUDGETS: dict[str, int | None] = {"minimal": 256, "low": 1024, "medium": 4096, "high": 16384}
NO_THINKING = ("none",)
# gpt-oss's template knows three levels (`reasoning_effort`, default medium); the others map onto them.
TEMPLATE_EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
# chat_template_kwargs are rendered into a prompt: small, JSON values only, and never the render's own inputs.
MAX_TEMPLATE_KWARGS = 32
MAX_TEMPLATE_KWARGS_BYTES = 8192


@dataclass(frozen=True, slots=True)
class ThinkingControl:
    enabled: bool | None = None  # None: the template's default
    budget: int | None = None  # thinking tokens; None: bounded by max_tokens only
    template_kwargs: tuple[tuple[str, Any], ...] = ()


def thinking_control(
    *,
    effort: str | None = None,
    enabled: bool | None = None,
    budget: int | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
    param: str = "chat_template_kwargs",
) -> ThinkingControl:
    """One request's controls. An explicit switch or budget wins over an effort level; an
    `enable_thinking` (or DeepSeek's `thinking`) in `template_kwargs` is the switch itself.
    An effort name newer than our table is a hint: the template's default, no budget."""
    kwargs = checked_template_kwargs(template_kwargs, param)
    for name in ("enable_thinking", "thinking"):
        if enabled is None and isinstance(kwargs.get(name), bool):
            enabled = kwargs[name]
    if effort is not None:
        if effort in NO_THINKING:
            enabled = False if enabled is None else enabled
        elif effort in EFFORT_BUDGETS or effort in TEMPLATE_EFFORT:
            enabled = True if enabled is None else enabled
            if budget is None:
                budget = EFFORT_BUDGETS.get(effort)
        if effort in TEMPLATE_EFFORT:
            kwargs.setdefault("reasoning_effort", TEMPLATE_EFFORT[effort])
    if enabled is False:
        budget = 0
    return ThinkingControl(enabled, budget, tuple(kwargs.items()))


def checked_template_kwargs(kwargs: Mapping[str, Any] | None, param: str) -> dict[str, Any]:
    """`chat_template_kwargs` as a template may see them, or a 400 naming what is wrong."""
    if not kwargs:
        return {}
    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise InvalidRequestError(f"{param} may set at most {MAX_TEMPLATE_KWARGS} names", param=param)
    for name in kwargs:
        if not name.isidentifier():
            raise InvalidRequestError(f"{param}: {name!r} is not a template variable name", param=f"{param}.{name}")
        if name in RESERVED_TEMPLATE_NAMES:
            raise InvalidRequestError(
                f"{param}.{name} is set by the server (the conversation itself), not by a request",
                param=f"{param}.{name}",
            )
    # The decoded request holds JSON values only; bounded so a template cannot be fed megabytes.
    if len(msgspec.json.encode(dict(kwargs))) > MAX_TEMPLATE_KWARGS_BYTES:
        raise InvalidRequestError(f"{param} is larger than {MAX_TEMPLATE_KWARGS_BYTES} bytes", param=param)
    return dict(kwargs)
