"""Wire types of `/v1/adapters`: LoRA adapters per generation tier."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from kernel.config import AdapterName


class AdapterCard(msgspec.Struct, tag_field="object", tag="adapter"):
    id: str
    model: str  # the base model's id (`light/gemma-3-270m`); requests name `<tier>:<id>`
    tier: str
    path: str
    status: str  # available (loads with the model), loaded, failed, unloaded
    source: str  # settings (<TIER>_ADAPTERS) or runtime (POST /v1/adapters/load)
    size_bytes: int | None
    rank: int | None  # where the adapter's files say it
    usage_count: int
    error: str | None = None


class AdapterList(msgspec.Struct):
    data: list[AdapterCard]
    object: Literal["list"] = "list"


class AdapterLoadRequest(msgspec.Struct, kw_only=True):
    model: str  # the tier (or its model)
    adapter: AdapterName
    path: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]  # inside MODELS_DIR


class AdapterUnloadRequest(msgspec.Struct, kw_only=True):
    model: str
    adapter: AdapterName
