"""Embeddings, whatever carries them: `/v1/embeddings`, a batch job's line or a collection."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import numpy.typing as npt

from embedders.base import EmbeddingBatch, EmbeddingOutput, EmbeddingRequest
from embedders.token_ids import openai_decoder
from kernel.errors import InvalidRequestError
from service.cache import ResponseCache
from service.metrics import RequestRecord
from service.schemas.embeddings import EmbeddingCreate, EmbeddingData, EmbeddingList, EmbeddingUsage
from service.security import check_batch_size
from service.serving.cached import lookup
from service.serving.input_limits import clip_texts, clip_token_ids
from service.tiers.families import EMBEDDING
from service.tiers.registry import Registry
from service.tiers.slots import TierSlot


class Embeddings:
    """The embedding tier's way in, for `/v1/embeddings`, batch-job lines and collections."""

    def __init__(self, registry: Registry, cache: ResponseCache) -> None:
        self._registry = registry
        self._cache = cache

    async def create(self, data: EmbeddingCreate, record: RequestRecord, *, background: bool = False) -> EmbeddingList:
        """`background`: a batch-job line, batched after every waiting interactive request."""
        inputs = _inputs(data.input)
        check_batch_size(len(inputs), self._registry.settings)
        slot = self._registry.tier_slot(data.model, "embedding", data.adapter)
        key, hit = lookup(self._cache, "embeddings", slot, data, EmbeddingList, record)
        if hit is not None:
            return hit
        await self._registry.ensure_loaded(slot)
        kind = data.embedding_type
        batch = await self.embed(
            slot,
            inputs,
            dense=kind == "dense",
            sparse=kind == "sparse" or data.return_sparse,
            colbert=kind == "colbert" or data.return_colbert,
            dimensions=data.dimensions,
            background=background,
        )
        record.prompt_tokens, record.generated = batch.prompt_tokens, True
        items = [_item(i, out, data) for i, out in enumerate(batch.outputs)]
        answer = EmbeddingList(items, data.model, EmbeddingUsage(batch.prompt_tokens, batch.prompt_tokens))
        self._cache.put(key, answer)
        return answer

    @staticmethod
    async def embed(
        slot: TierSlot,
        inputs: list[str] | list[list[int]],
        *,
        dense: bool = True,
        sparse: bool = False,
        colbert: bool = False,
        dimensions: int | None = None,
        background: bool = False,
    ) -> EmbeddingBatch:
        """`inputs` embedded on the loaded `slot`: texts or token ids, clipped to what the model reads."""
        # The model truncates long inputs anyway: cut them first, so tokenising them cannot hold the tier.
        max_tokens = slot.context_length or slot.settings.n_ctx
        if inputs and isinstance(inputs[0], str):
            inputs = clip_texts(inputs, max_tokens)  # type: ignore[arg-type]
        else:
            inputs = clip_token_ids(inputs, max_tokens)  # type: ignore[arg-type]
            decode = openai_decoder(slot.settings.token_ids)
            if decode is not None:
                inputs = [decode(item) for item in inputs]  # type: ignore[arg-type]
        request = EmbeddingRequest(inputs, dense=dense, sparse=sparse, colbert=colbert, dimensions=dimensions)
        return await EMBEDDING.embed(slot, request, background=background)


def _inputs(value: str | list[Any]) -> list[str] | list[list[int]]:
    """A string, a list of strings, one list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidRequestError("input must not be empty", param="input")
    if all(isinstance(v, str) for v in value):
        return list(value)
    if all(_is_token(v) for v in value):
        return [list(value)]
    if all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value):
        return [list(v) for v in value]
    raise InvalidRequestError(
        "input must be a string, a list of strings, a list of token ids or a list of token-id lists", param="input"
    )


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _item(index: int, out: EmbeddingOutput, req: EmbeddingCreate) -> EmbeddingData:
    b64 = req.encoding_format == "base64"
    embedding: Any
    if req.embedding_type == "sparse":
        embedding = _sparse(out.sparse, b64)
    elif req.embedding_type == "colbert":
        embedding = _vectors(out.colbert, b64)
    else:
        embedding = _vectors(out.dense, b64)
    extra_sparse = req.return_sparse and req.embedding_type != "sparse"
    extra_colbert = req.return_colbert and req.embedding_type != "colbert"
    return EmbeddingData(
        index,
        embedding,
        sparse_embedding=_sparse(out.sparse, b64) if extra_sparse else None,
        colbert_embedding=_vectors(out.colbert, b64) if extra_colbert else None,
    )


def _vectors(values: npt.NDArray[np.float32] | None, b64: bool) -> str | list[Any]:
    """A dense vector or a ColBERT matrix: OpenAI's base64 (little-endian float32, row after row)
    or JSON floats (float64 first, so a float32 prints as its exact decimal like `encode()` gave)."""
    assert values is not None
    if b64:
        return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")
    listed: list[Any] = values.astype(np.float64).tolist()
    return listed


def _sparse(weights: dict[str, float] | None, b64: bool) -> str | dict[str, float]:
    """Lexical weights: `{"<token id>": weight}`, or in base64 n little-endian uint32 token ids
    followed by their n float32 weights (README, "Embeddings")."""
    assert weights is not None
    if not b64:
        return weights
    ids = np.fromiter((int(k) for k in weights), dtype="<u4", count=len(weights))
    values = np.fromiter(weights.values(), dtype="<f4", count=len(weights))
    return base64.b64encode(ids.tobytes() + values.tobytes()).decode("ascii")
