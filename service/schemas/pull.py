from __future__ import annotations

from typing import Annotated

import msgspec


class PullRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of `POST /v1/models/pull`: `owner/name[:quant or file.gguf]` on the hub."""

    model: Annotated[str, msgspec.Meta(min_length=3, max_length=512)]
    revision: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    stream: bool = True


class PullResult(msgspec.Struct):
    status: str
    id: str


class DeleteResult(msgspec.Struct):
    id: str
    deleted: bool = True
    object: str = "model"
