"""Reasoning controls of the four APIs mapped onto what a model has: its chat template's thinking
switch (`enable_thinking` for Qwen3-style templates) and a budget of thinking tokens that the
engine enforces while decoding (it closes the block when the budget is spent).

chat `reasoning_effort` / `chat_template_kwargs`, Responses `reasoning.effort`, Messages
`thinking` (`enabled` + `budget_tokens`, `adaptive`, `disabled`) and `output_config.effort` all
come through `thinking_control`. A model that does not think ignores them: effort is a hint there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Thinking tokens allowed per effort level (OpenAI's names and Anthropic's); levels above `high`
# and names newer than this table leave the budget to `max_tokens`.
EFFORT_BUDGETS: dict[str, int | None] = {"minimal": 256, "low": 1024, "medium": 4096, "high": 16384}
NO_THINKING = ("none",)


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
) -> ThinkingControl:
    """One request's controls. An explicit switch or budget wins over an effort level; an
    `enable_thinking` in `template_kwargs` is the switch itself."""
    kwargs = dict(template_kwargs or {})
    if enabled is None and isinstance(kwargs.get("enable_thinking"), bool):
        enabled = kwargs["enable_thinking"]
    if effort is not None:
        if effort in NO_THINKING:
            enabled = False if enabled is None else enabled
        else:
            enabled = True if enabled is None else enabled
            if budget is None:
                budget = EFFORT_BUDGETS.get(effort)
    if enabled is False:
        budget = 0
    return ThinkingControl(enabled, budget, tuple(kwargs.items()))
