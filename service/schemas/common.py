"""Wire types shared by the OpenAI-compatible endpoints. Unknown request fields are accepted."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
TopK = Annotated[int, msgspec.Meta(ge=0)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
Penalty = Annotated[float, msgspec.Meta(gt=0.0)]
PresencePenalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]  # OpenAI's range, also for frequency
Bias = Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]
# Engines seed 32-bit generators: a larger seed would be masked, and two seeds would give one output.
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class JsonSchemaSpec(msgspec.Struct, kw_only=True):
    name: str = "response"
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormatSpec(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaSpec | None = None
    schema: dict[str, Any] | None = None  # llama-cpp-python's form: {"type": "json_object", "schema": {...}}


class SamplingFields(msgspec.Struct, kw_only=True):
    """Fields common to chat and legacy completions; None means "use the tier's default"."""

    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    repeat_penalty: Penalty | None = None
    presence_penalty: PresencePenalty | None = None
    frequency_penalty: PresencePenalty | None = None
    logit_bias: Annotated[dict[str, Bias], msgspec.Meta(max_length=1024)] | None = None  # token id -> bias
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=128)] = 1  # OpenAI's bound; a tier's queue bounds it too
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormatSpec | None = None
    user: str | None = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class UsageInfo(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None
    retry_after: float | msgspec.UnsetType = msgspec.UNSET  # 429s only: seconds, as in Retry-After


class ErrorResponse(msgspec.Struct):
    """The body of every error answer, OpenAI's envelope."""

    error: ErrorBody
