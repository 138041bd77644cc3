"""`POST /tokenize` and `/detokenize` (also under /v1): a generation tier's tokenizer, for counting
and checking prompts exactly as chat and completions would see them."""

from __future__ import annotations

from litestar import Controller, post

from backends.base import GenerationRequest
from kernel.errors import InvalidRequestError
from service.schemas.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from service.serving.generation import chat_messages
from service.serving.input_limits import check_prompt_length
from service.serving.tool_calls import tool_dicts
from service.tiers.families import GENERATION
from service.tiers.registry import Registry


class TokenizeController(Controller):
    path = "/"

    @post(["/tokenize", "/v1/tokenize"], status_code=200, summary="Tokenize a prompt or chat messages")
    async def tokenize(self, data: TokenizeRequest, registry: Registry) -> TokenizeResponse:
        if (data.prompt is None) == (data.messages is None):
            raise InvalidRequestError("Send either prompt or messages", param="prompt")
        slot = registry.generation_target(data.model)[0]
        request = GenerationRequest(
            prompt=data.prompt or "",
            messages=chat_messages(data.messages) if data.messages is not None else None,
            tools=tool_dicts(data.tools) if data.tools else None,
        )
        await registry.ensure_loaded(slot)
        context = slot.context_length or slot.settings.n_ctx
        check_prompt_length(request, context)  # bounds the tokenizer's work, as for generation
        tokens = await GENERATION.tokenize(slot, request)
        return TokenizeResponse(tokens, len(tokens), context)

    @post(["/detokenize", "/v1/detokenize"], status_code=200, summary="Turn token ids back into text")
    async def detokenize(self, data: DetokenizeRequest, registry: Registry) -> DetokenizeResponse:
        slot = await registry.ensure_loaded(registry.generation_target(data.model)[0])
        return DetokenizeResponse(await GENERATION.detokenize(slot, data.tokens))
