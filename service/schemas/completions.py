from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from service.schemas.common import SamplingFields, UsageInfo


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: str | list[Any]  # a string, strings, token ids or lists of token ids
    echo: bool = False
    suffix: str | None = None
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None  # legacy: how many alternatives


class CompletionLogprobs(msgspec.Struct):
    """The legacy shape: parallel lists per token (with `echo`, the prompt's first; its first token,
    which nothing predicts, has null entries)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    object: Literal["text_completion"] = "text_completion"
