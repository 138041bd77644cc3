"""A model's raw text as the parts an API answer has: thinking (`reasoning_content`), content, and
tool calls. Every endpoint (chat, Messages, Responses) reads a generation through one `Answer`."""

from __future__ import annotations

from dataclasses import dataclass

from backends.reasoning import ReasoningFormat, reasoning_format
from backends.tools import ToolCall, tool_format
from service.serving.tool_calls import ToolCallFilter, ToolPlan
from service.tiers.slots import TierSlot


@dataclass(frozen=True, slots=True)
class Parts:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


def _partial_tail(text: str, marker: str) -> int:
    """How many trailing characters of `text` could still grow into `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ThinkingSplitter:
    """Streamed text → (thinking, the rest). Thinking is the block the answer opens with (or the
    prompt opened); text that may still become a marker is held back, so no marker leaks out."""

    def __init__(self, fmt: ReasoningFormat) -> None:
        self._fmt = fmt
        self._state = "thinking" if fmt.opened_by_prompt else "start"
        self._held = ""

    def feed(self, text: str) -> Parts:
        self._held += text
        if self._state == "start":
            head = self._held.lstrip()
            if head.startswith(self._fmt.open):
                self._state, self._held = "thinking", head[len(self._fmt.open) :]
            elif not head or self._fmt.open.startswith(head):
                return Parts()  # may still open a thinking block
            else:
                self._state = "answer"
        if self._state == "thinking":
            at = self._held.find(self._fmt.close)
            if at < 0:
                keep = _partial_tail(self._held, self._fmt.close)
                out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
                return Parts(reasoning=out)
            thought, self._held = self._held[:at], self._held[at + len(self._fmt.close) :]
            self._state = "after"
            return Parts(thought, self._answer())
        return Parts(content=self._answer())

    def _answer(self) -> str:
        if self._state == "after":  # the blank lines between thinking and answer are neither
            self._held = self._held.lstrip()
            if not self._held:
                return ""
            self._state = "answer"
        out, self._held = self._held, ""
        return out

    def finish(self) -> Parts:
        """What is held at the end: an unclosed block's last text is thinking (the answer was cut)."""
        held, self._held = self._held, ""
        return Parts(reasoning=held) if self._state == "thinking" else Parts(content=held)


class Answer:
    """Thinking split off first (when the model thinks), then tool calls out of what remains."""

    def __init__(
        self, slot: TierSlot, plan: ToolPlan, *, constrained: bool = False, thinking: bool | None = None
    ) -> None:
        """`thinking`: the request's thinking switch, which may decide whether the prompt opened the block."""
        # A cache replay may come before the tier loaded: then only the settings tell the formats.
        fmt = slot.reasoning or reasoning_format(None, slot.settings.reasoning_parser)
        fmt = fmt.switched(thinking) if fmt is not None else None
        # A grammar (response_format, a forced call) holds the answer from its first token: no thinking.
        thinks = fmt is not None and not constrained and plan.forced is None
        self._thinking = ThinkingSplitter(fmt) if thinks and fmt is not None else None
        self._calls = ToolCallFilter(slot.tool_format or tool_format(None, slot.settings.tool_parser), plan)
        self._plan = plan

    def feed(self, text: str) -> Parts:
        """The thinking and content safe to send now."""
        parts = self._thinking.feed(text) if self._thinking is not None else Parts(content=text)
        if not self._plan.active or not parts.content:
            return parts
        return Parts(parts.reasoning, self._calls.feed(parts.content))

    def finish(self) -> tuple[Parts, list[ToolCall]]:
        """The rest, once generation ended, and the tool calls found."""
        tail = self._thinking.finish() if self._thinking is not None else Parts()
        if not self._plan.active:
            return tail, []
        content = self._calls.feed(tail.content) if tail.content else ""
        rest, calls = self._calls.finish()
        return Parts(tail.reasoning, content + rest), calls

    def split(self, text: str) -> tuple[Parts, list[ToolCall]]:
        """A whole answer at once."""
        first = self.feed(text)
        rest, calls = self.finish()
        return Parts(first.reasoning + rest.reasoning, first.content + rest.content), calls
