"""Embeddings, whatever carries them: `/v1/embeddings` or a batch job's line."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from embedders.base import EmbeddingOutput, EmbeddingRequest
from embedders.token_ids import openai_decoder
from kernel.errors import InvalidRequestError
from service.dispatch import Dispatcher
from service.input_limits import clip_texts, clip_token_ids
from service.metrics import RequestRecord
from service.registry import Registry, TierSlot
from service.schemas.embeddings import EmbeddingCreate, EmbeddingData, EmbeddingList, EmbeddingUsage
from service.security import check_batch_size


async def serve_embeddings(
    data: EmbeddingCreate,
    registry: Registry,
    dispatch: Dispatcher,
    record: RequestRecord,
    *,
    background: bool = False,
) -> EmbeddingList:
    """`background`: a batch-job line, batched after every waiting interactive request."""
    inputs = _inputs(data.input)
    check_batch_size(len(inputs), registry.settings)
    slot = await registry.tier_for(data.model, "embedding")
    return await dispatch.cached(
        "embeddings",
        slot,
        data,
        EmbeddingList,
        record,
        lambda: _embed(registry, slot, data, inputs, record, background),
    )


async def _embed(
    registry: Registry,
    slot: TierSlot,
    data: EmbeddingCreate,
    inputs: list[str] | list[list[int]],
    record: RequestRecord,
    background: bool,
) -> EmbeddingList:
    # The model truncates long inputs anyway: cut them first, so tokenising them cannot hold the tier.
    max_tokens = slot.context_length or slot.settings.n_ctx
    if inputs and isinstance(inputs[0], str):
        inputs = clip_texts(inputs, max_tokens)  # type: ignore[arg-type]
    else:
        inputs = clip_token_ids(inputs, max_tokens)  # type: ignore[arg-type]
    decode = openai_decoder(slot.settings.token_ids)
    if decode is not None:
        inputs = [item if isinstance(item, str) else decode(item) for item in inputs]
    kind = data.embedding_type
    request = EmbeddingRequest(
        inputs,
        dense=kind == "dense",
        sparse=kind == "sparse" or data.return_sparse,
        colbert=kind == "colbert" or data.return_colbert,
        dimensions=data.dimensions,
    )
    batch = await registry.embed(slot, request, background=background)
    record.prompt_tokens, record.generated = batch.prompt_tokens, True
    items = [_item(i, out, data) for i, out in enumerate(batch.outputs)]
    usage = EmbeddingUsage(batch.prompt_tokens, batch.prompt_tokens)
    return EmbeddingList(items, data.model, usage)


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
    embedding: Any
    if req.embedding_type == "sparse":
        embedding = out.sparse
    elif req.embedding_type == "colbert":
        embedding = out.colbert
    else:
        assert out.dense is not None
        if req.encoding_format == "base64":
            # OpenAI's format: little-endian float32 bytes, base64-encoded.
            embedding = base64.b64encode(out.dense.astype("<f4", copy=False).tobytes()).decode("ascii")
        else:
            embedding = np.asarray(out.dense, dtype=np.float64).tolist()
    return EmbeddingData(
        index,
        embedding,
        sparse_embedding=out.sparse if req.return_sparse and req.embedding_type != "sparse" else None,
        colbert_embedding=out.colbert if req.return_colbert and req.embedding_type != "colbert" else None,
    )
