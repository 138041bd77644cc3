"""Wire types shared by the OpenAI-compatible endpoints. Unknown request fields are accepted."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect as mi

from kernel.config import AdapterName
from kernel.errors import InvalidRequestError

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
    user: Annotated[str, msgspec.Meta(max_length=1024)] | None = None
    prompt_cache_key: Annotated[str, msgspec.Meta(max_length=1024)] | None = None  # remote tiers: affinity
    adapter: AdapterName | None = None  # a LoRA adapter of the tier (or `model: "<tier>:<adapter>"`)


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


UNKNOWN_FIELD = "Object contains unknown field "  # msgspec's words for a key a strict struct refuses


def decode_strict(body: bytes, type_: Any) -> Any:
    """A JSON body decoded strictly against `type_` (no `"stream": 1` passing as a boolean), every
    failure a 400 naming where: the one decoding of request bodies, for HTTP and the WebSocket."""
    try:
        return msgspec.json.decode(body or b"null", type=type_, strict=True)
    except msgspec.ValidationError as exc:
        reason, _, where = str(exc).partition(" - at `$")
        param = where.rstrip("`").lstrip(".") or None
        if reason.startswith(UNKNOWN_FIELD):  # bodies that refuse unknown keys: name the key
            raise unknown_field_error(type_, param, reason) from None
        raise InvalidRequestError(
            f"Invalid request: {reason}" + (f" at `{param}`" if param else ""), param=param
        ) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"Malformed JSON body: {exc}") from None
    except UnicodeDecodeError:
        raise InvalidRequestError("Malformed JSON body: it is not valid UTF-8") from None
    except RecursionError:
        raise InvalidRequestError("Malformed JSON body: nested too deeply") from None


def unknown_field_error(type_: Any, where: str | None, reason: str) -> InvalidRequestError:
    """The 400 for msgspec's `reason` (UNKNOWN_FIELD and the key) in the object at `where` (`rag`,
    `messages[0]`) of a body of `type_`, naming the known field it is closest to (`topk` → `top_k`),
    as .env settings do."""
    field = reason.removeprefix(UNKNOWN_FIELD).strip("`")
    param = ".".join(filter(None, (where, field)))
    known = _fields_at(type_, where or "")
    close = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
    hint = f"; did you mean `{'.'.join(filter(None, (where, close[0])))}`?" if close else ""
    listed = f" (known: {', '.join(known)})" if known and not close else ""
    return InvalidRequestError(f"Invalid request: unknown field `{param}`{hint}{listed}", param=param)


def _fields_at(type_: Any, where: str) -> list[str]:
    """The field names of the object at `where` in `type_`; [] where the path cannot be followed."""
    info: mi.Type = mi.type_info(type_)
    for step in filter(None, re.split(r"[.\[\]]", where)):
        info = _struct_in(info, step.isdigit())
        if step.isdigit():
            continue
        if not isinstance(info, mi.StructType):
            return []
        info = next((f.type for f in info.fields if f.encode_name == step), mi.AnyType())
    found = _struct_in(info, False)
    return [f.encode_name for f in found.fields] if isinstance(found, mi.StructType) else []


def _struct_in(info: mi.Type, item: bool) -> mi.Type:
    """Through `| None` (and into a list's items when `item`) to the struct it holds."""
    if isinstance(info, mi.UnionType):  # `X | None` only: in a union of several, which one was meant is unknown
        held = [t for t in info.types if not isinstance(t, mi.NoneType)]
        info = held[0] if len(held) == 1 else info
    if item and isinstance(info, mi.ListType):
        info = info.item_type
    return info
