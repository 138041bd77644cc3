"""The generation engine contract: neutral request/response types and one small ABC.

Engines implement four things (load, encode a prompt, render chat, decode tokens); the shared
`stream()` built on them does the context check, `max_tokens`, stop strings and usage, so both
engines behave identically at the HTTP surface.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from service.errors import ContextLengthExceeded, InvalidRequestError

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Structured output: any JSON object, or JSON matching `schema`."""

    type: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """`messages` (rendered with the model's chat template) or `prompt` (text or token ids)."""

    prompt: str | list[int] = ""
    messages: tuple[dict[str, str], ...] | None = None
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    response_format: ResponseFormat | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of generated text; the last chunk of a stream carries `finish_reason` and `usage`."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class Token:
    """One decoded token as an engine yields it. `text` may be "" (a partial UTF-8 sequence)."""

    text: str
    cached_tokens: int = 0  # set on the first token: prompt tokens reused from a cache


@dataclass(frozen=True, slots=True)
class EngineInfo:
    engine: str
    device: str
    context_length: int
    extras: dict[str, Any] = field(default_factory=dict)


class StopBuffer:
    """Holds back text that could still become a stop string, so clients never see half of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        self._pending += text
        if not self._stops:
            out, self._pending = self._pending, ""
            return out, False
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out = self._pending[: min(hits)]
            self._pending = ""
            return out, True
        # Emit all but the longest suffix that is a prefix of some stop string.
        keep = 0
        for n in range(min(self._hold, len(self._pending)), 0, -1):
            tail = self._pending[-n:]
            if any(s.startswith(tail) for s in self._stops):
                keep = n
                break
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class Backend(abc.ABC):
    """A loaded generation model. Not thread-safe: the registry gives each one a single worker."""

    name: str = "backend"

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights; raise an `LLMServiceError` with a clear message on failure."""

    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Tokenize a prompt, adding BOS unless the text already starts with it."""

    @abc.abstractmethod
    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """Apply the model's chat template and the assistant generation prompt."""

    @abc.abstractmethod
    def decode(self, prompt: list[int], request: GenerationRequest, max_tokens: int) -> Iterator[Token]:
        """Yield up to `max_tokens` generated tokens, ending early at end-of-generation.

        Closing the iterator must stop generation promptly (client disconnects)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model's memory."""

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def stream(self, request: GenerationRequest) -> Iterator[Chunk]:
        param = "prompt" if request.messages is None else "messages"
        if request.messages is not None:
            prompt = self.encode(self.render_chat(request.messages))
        elif isinstance(request.prompt, list):
            prompt = request.prompt
        else:
            prompt = self.encode(request.prompt)
        context = self.info().context_length
        if not prompt:
            raise InvalidRequestError("The prompt is empty.", param=param)
        if len(prompt) >= context:
            raise ContextLengthExceeded(len(prompt), context, param=param)
        max_tokens = min(request.max_tokens, context - len(prompt))
        stops = StopBuffer(request.stop)
        count = cached = 0
        finish: FinishReason = "stop"
        tokens = self.decode(prompt, request, max_tokens)
        try:
            for token in tokens:
                if count == 0:
                    cached = token.cached_tokens
                count += 1
                text, hit = stops.feed(token.text)
                if text:
                    yield Chunk(text)
                if hit:
                    break
            else:
                finish = "length" if count >= max_tokens else "stop"
                if tail := stops.flush():
                    yield Chunk(tail)
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
        yield Chunk("", finish_reason=finish, usage=Usage(len(prompt), count, cached))
