from __future__ import annotations

from typing import Any, Literal

import msgspec


class CatalogueInfo(msgspec.Struct, omit_defaults=True):
    """What a MODELS_DIR entry's files say about it (GGUF header, config.json)."""

    kind: str  # generation, embedding or reranker
    format: str  # gguf, mlx or hf
    quantisation: str | None = None
    architecture: str | None = None
    capabilities: list[str] | None = None
    projector: bool | None = None  # a GGUF with an mmproj file beside it


class ModelCard(msgspec.Struct, omit_defaults=True, tag_field="object", tag="model"):
    """`object` is msgspec's tag, so `omit_defaults` (which drops unset details) keeps it."""

    id: str
    created: int
    owned_by: str
    tier: str
    status: str
    engine: str | None = None
    device: str | None = None
    context_length: int | None = None
    dimension: int | None = None  # embedding tiers: the model's vector size
    error: str | None = None
    size_bytes: int | None = None  # on disk
    loaded_at: int | None = None
    last_used: int | None = None
    usage_count: int | None = None  # requests served by the model (cache hits excluded)
    in_flight: int | None = None
    keep_alive: int | None = None
    pinned: bool | None = None
    aliases: list[str] | None = None  # MODEL_ALIASES globs that name this tier
    capabilities: list[str] | None = None  # ["vision"]: the tier takes images (as Ollama and LM Studio say)
    upstreams: list[dict[str, Any]] | None = None  # a remote tier's servers: state, in flight, errors
    catalogue: CatalogueInfo | None = None  # the MODELS_DIR entry this model is (any model there is listed)
    details: dict[str, Any] | None = None


class LoadRequest(msgspec.Struct, kw_only=True):
    """Body of `POST /v1/models/{id}/load`: optionally a model inside MODELS_DIR for that tier."""

    model_path: str | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"
