"""Operator requests (`/v1/cache/clear`)."""

from __future__ import annotations

from typing import Literal

import msgspec


class CacheClearRequest(msgspec.Struct, kw_only=True):
    target: Literal["response", "prefix", "all"]  # required: an empty POST must not wipe everything
