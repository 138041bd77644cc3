from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

EmbeddingType = Literal["dense", "sparse", "colbert"]


class EmbeddingCreate(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[Any]  # a string, strings, token ids, or lists of token ids
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None
    # BGE-M3 extras (seed API): what `embedding` holds, and a sparse vector beside a dense one.
    embedding_type: EmbeddingType = "dense"
    return_sparse: bool = False
    return_colbert: bool = False
    adapter: str | None = None  # refused when set: an embedding model takes no LoRA adapter


class EmbeddingData(msgspec.Struct, omit_defaults=True, tag_field="object", tag="embedding"):
    """`object` is msgspec's tag, so `omit_defaults` (which drops the empty extras) keeps it."""

    index: int
    # list[float], a base64 string, {token id: weight} or a list of vectors: msgspec cannot decode
    # a union of several array types, and cached answers are decoded, so this stays untyped.
    embedding: Any
    # JSON, or a base64 string with encoding_format=base64 (layouts in the README).
    sparse_embedding: dict[str, float] | str | None = None
    colbert_embedding: list[list[float]] | str | None = None


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct):
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
    object: Literal["list"] = "list"
