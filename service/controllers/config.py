"""`GET /v1/config` (effective settings, secrets masked) and `PATCH /v1/config` (admin)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get, patch

from service.runtime_config import ConfigPatch, RuntimeConfig


class ConfigController(Controller):
    path = "/v1/config"

    @get(summary="Effective settings (API keys masked) and which of them can change live")
    async def show(self, config: RuntimeConfig) -> dict[str, Any]:
        return config.view()

    @patch(
        summary="Change per-tier defaults and the rate limit on the running server",
        description=(
            'Body: `{"tiers": {"light": {"temperature": 0.2}}, "server": {"rate_limit_per_minute": 60},'
            ' "persist": false}`. Values are checked as `.env` values are; new requests use them. '
            "`persist: true` also writes the changed lines to the server's `.env`."
        ),
        opt={"admin": True},
    )
    async def change(self, config: RuntimeConfig, data: ConfigPatch) -> dict[str, Any]:
        return await config.update(data)
