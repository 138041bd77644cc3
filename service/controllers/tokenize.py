"""`POST /tokenize` and `/detokenize` (also under /v1): a generation tier's tokenizer, for counting
and checking prompts exactly as chat and completions would see them."""

from __future__ import annotations

from litestar import Controller, post

from service.schemas.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from service.serving.chat import serve_detokenize, serve_tokenize
from service.serving.generation import Generation


class TokenizeController(Controller):
    path = "/"

    @post(["/tokenize", "/v1/tokenize"], status_code=200, summary="Tokenize a prompt or chat messages")
    async def tokenize(self, data: TokenizeRequest, generation: Generation) -> TokenizeResponse:
        return await serve_tokenize(data, generation)

    @post(["/detokenize", "/v1/detokenize"], status_code=200, summary="Turn token ids back into text")
    async def detokenize(self, data: DetokenizeRequest, generation: Generation) -> DetokenizeResponse:
        return await serve_detokenize(data, generation)
