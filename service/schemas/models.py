from __future__ import annotations

from typing import Any, Literal

import msgspec


class ModelCard(msgspec.Struct, omit_defaults=True):
    id: str
    created: int
    owned_by: str
    tier: str
    status: str
    object: Literal["model"] = "model"
    engine: str | None = None
    device: str | None = None
    context_length: int | None = None
    error: str | None = None
    details: dict[str, Any] | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"
