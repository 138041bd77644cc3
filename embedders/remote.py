"""An embedding tier served by OpenAI-compatible upstreams (`EMBEDDING_BACKEND=remote`): the
upstream's `/v1/embeddings` answer as our `EmbeddingBatch` (the pool in backends/remote.py sends it)."""

from __future__ import annotations

from typing import Any

import numpy as np

from embedders.base import EmbeddingBatch, EmbeddingOutput, EmbeddingRequest, apply_dimensions
from kernel.errors import InvalidRequestError, UpstreamError


def embeddings_body(request: EmbeddingRequest) -> dict[str, Any]:
    """The upstream request: dense vectors as floats (sparse and ColBERT outputs are BGE-M3's, ours only)."""
    if request.sparse or request.colbert:
        raise InvalidRequestError("A remote embedding tier returns dense vectors only", param="embedding_type")
    return {"input": list(request.inputs), "encoding_format": "float"}


def embedding_batch(answer: Any, request: EmbeddingRequest) -> EmbeddingBatch:
    """`answer`'s vectors in input order, `dimensions` applied here (an upstream may not know it)."""
    try:
        items = sorted(answer["data"], key=lambda item: item["index"])
        vectors = [np.asarray(item["embedding"], dtype=np.float32) for item in items]
        tokens = int((answer.get("usage") or {}).get("prompt_tokens") or 0)
    except (KeyError, TypeError, ValueError):
        raise UpstreamError("The upstream's embeddings answer is not the OpenAI shape") from None
    if len(vectors) != len(request.inputs):
        raise UpstreamError(f"The upstream returned {len(vectors)} embeddings for {len(request.inputs)} inputs")
    share = tokens // len(vectors) if vectors else 0  # usage is per request: spread it over the inputs
    outputs = [EmbeddingOutput(share, dense=v) for v in vectors]
    if request.dimensions is not None:
        if not 1 <= request.dimensions <= len(vectors[0]):
            raise InvalidRequestError(
                f"dimensions must be between 1 and {len(vectors[0])} for this model", param="dimensions"
            )
        outputs = [EmbeddingOutput(o.tokens, dense=apply_dimensions(o.dense, request.dimensions)) for o in outputs]  # type: ignore[arg-type]
    return EmbeddingBatch(outputs, tokens)
