"""Where a reasoning model's thinking is: between `<think>` and `</think>` (Qwen3, DeepSeek-R1,
QwQ, and the models trained on their format). Some templates open the block themselves at the end
of the generation prompt (DeepSeek-R1 appends `<think>\\n`), so the answer starts inside it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ReasoningSetting = Literal["auto", "none", "think"]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    open: str
    close: str
    opened_by_prompt: bool  # the generation prompt ends with `open`: the answer begins as thinking


def reasoning_format(template: str | None, setting: str, generation_prompt: str = "") -> ReasoningFormat | None:
    """`{TIER}_REASONING_PARSER`, else `think` when the chat template knows `</think>`; None: no
    thinking to separate. `generation_prompt` is a rendered prompt, to see whether it opens the block."""
    if setting == "none" or (setting == "auto" and THINK_CLOSE not in (template or "")):
        return None
    return ReasoningFormat(THINK_OPEN, THINK_CLOSE, generation_prompt.rstrip().endswith(THINK_OPEN))
