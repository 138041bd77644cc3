"""Where a reasoning model's thinking is: between `<think>` and `</think>` (Qwen3, DeepSeek-R1,
QwQ, and the models trained on their format). Some templates open the block themselves at the end
of the generation prompt (DeepSeek-R1 appends `<think>\\n`), so the answer starts inside it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

ReasoningSetting = Literal["auto", "none", "think"]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    open: str
    close: str
    opened_by_prompt: bool  # the generation prompt ends with `open`: the answer begins as thinking
    # The same with the template's thinking switch on / off, where rendering told (None: unknown).
    # A template may open the block only when thinking is on (DeepSeek-V3.1), or write a closed,
    # empty one when it is off.
    opened_if_on: bool | None = None
    opened_if_off: bool | None = None

    def switched(self, thinking: bool | None) -> ReasoningFormat:
        """The format for a request that set the thinking switch (None: the template's default)."""
        opened = None if thinking is None else self.opened_if_on if thinking else self.opened_if_off
        return self if opened is None else replace(self, opened_by_prompt=opened)


def reasoning_format(template: str | None, setting: str, generation_prompt: str = "") -> ReasoningFormat | None:
    """`{TIER}_REASONING_PARSER`, else `think` when the chat template knows `</think>`; None: no
    thinking to separate. `generation_prompt` is a rendered prompt, to see whether it opens the block."""
    if setting == "none" or (setting == "auto" and THINK_CLOSE not in (template or "")):
        return None
    return ReasoningFormat(THINK_OPEN, THINK_CLOSE, generation_prompt.rstrip().endswith(THINK_OPEN))


class ThinkingBudget:
    """One sequence's thinking, counted while it decodes: once `budget` tokens were spent inside the
    block, the close marker's tokens (`close_tokens`) are forced in as if sampled, then the model
    answers. The budget covers every block of the answer; 0 closes a block as soon as it opens."""

    def __init__(self, fmt: ReasoningFormat, budget: int, close_tokens: list[int], *, inside: bool) -> None:
        self._fmt = fmt
        self._budget = max(0, budget)
        self._close = close_tokens
        self._queue: list[int] = []
        self._forced_last = False
        self._tail = ""  # recent text, to see a marker split over several tokens
        self.inside = inside  # the prompt opened the block (DeepSeek-R1) or the model did
        self.spent = 0

    def forced(self) -> int | None:
        """The token to emit next instead of sampling one; None: sample as usual."""
        if not self._queue and self.inside and self.spent >= self._budget and self._close:
            self._queue, self.inside, self._tail = list(self._close), False, ""
        self._forced_last = bool(self._queue)
        return self._queue.pop(0) if self._queue else None

    def observe(self, text: str) -> None:
        """The text of the token just emitted (sampled or forced)."""
        if self._forced_last:
            return
        if self.inside:
            self.spent += 1
        self._tail = (self._tail + text)[-64:]
        while (at := self._tail.find(marker := self._fmt.close if self.inside else self._fmt.open)) >= 0:
            self.inside = not self.inside
            self._tail = self._tail[at + len(marker) :]
