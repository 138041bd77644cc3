"""`/tokenize` and `/detokenize` (the shapes vLLM and llama-server clients use)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from service.schemas.chat import ChatMessage, ToolSpec


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """Either `prompt` (text, tokenized as /v1/completions would) or `messages` (as chat would)."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: Annotated[list[ToolSpec], msgspec.Meta(max_length=128)] | None = None


class TokenizedImage(msgspec.Struct):
    """An image's places in a tokenized prompt: `tokens` places (one per embedding the model reads)
    before `tokens[offset]` of the response's ids."""

    index: int | None  # which image of the request, in order; null where the engine cannot tell
    offset: int
    tokens: int


class TokenizeResponse(msgspec.Struct):
    tokens: list[int]  # vocabulary ids only: the images' places are in `images`
    count: int  # every place the prompt takes, images' included (`usage.prompt_tokens`)
    max_model_len: int  # the tier's context window, for checking that a prompt fits
    images: list[TokenizedImage] = msgspec.field(default_factory=list)


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str
    tokens: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=1_000_000)]


class DetokenizeResponse(msgspec.Struct):
    prompt: str
