"""Runtime configuration: `GET /v1/config` shows the effective settings, `PATCH /v1/config` changes
the ones that are safe to change on a running server.

A change is turned into the variables `.env` would hold and checked by the same parser that read
`.env` at start (`service.settings.with_variables`), so the bounds and messages are the same. It
then goes to the objects that use each value: the tier slots (read by every new request), the
workers' queue bounds, the idle unloader and the rate limiter. Requests already running keep the
values they started with. With `"persist": true` the changed lines are also written to `.env`.
"""

from __future__ import annotations

import asyncio
import difflib
import os
from pathlib import Path
from typing import Any

import msgspec

from kernel.config import Sampling, TierSettings
from kernel.errors import InvalidRequestError
from service.lifecycle import Lifecycle
from service.security import Security
from service.settings import (
    LIVE_SERVER_FIELDS,
    LIVE_TIER_FIELDS,
    TIERS,
    Settings,
    SettingsError,
    applies_to,
    with_variables,
    write_variables,
)
from service.tiers.registry import Registry
from service.tiers.slots import TierState

_SECRETS = ("api_keys", "admin_api_keys", "collections_api_key")
_MASK = "********"
_MAX_VALUE = 100  # characters: a value is a number; errors echo it


class ConfigPatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Unknown keys are refused: a misspelt setting must not look applied."""

    server: dict[str, Any] = {}
    tiers: dict[str, dict[str, Any]] = {}
    persist: bool = False  # also write the changed lines to the .env file the server read


class RuntimeConfig:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        lifecycle: Lifecycle,
        security: Security,
        env_file: str | Path | None,
    ) -> None:
        self.settings = settings
        self._registry = registry
        self._lifecycle = lifecycle
        self._security = security
        self._env_file = Path(env_file) if env_file is not None else None
        self._lock = asyncio.Lock()  # one change at a time: each starts from the last one's result

    def view(self) -> dict[str, Any]:
        server = msgspec.to_builtins(self.settings)
        server.pop("tiers")
        for name in _SECRETS:
            if server[name]:
                server[name] = _MASK
        tiers = {  # the slots' settings (they include a model swapped in by an admin load), those that apply
            slot.name: {
                k: v for k, v in msgspec.to_builtins(slot.settings).items() if k != "name" and applies_to(slot.name, k)
            }
            for slot in self._registry.configured()
        }
        return {
            "server": server,
            "tiers": tiers,
            "live": {"server": list(LIVE_SERVER_FIELDS), "tiers": list(LIVE_TIER_FIELDS)},
            "env_file": str(self._env_file) if self._env_file is not None else None,
        }

    async def update(self, patch: ConfigPatch) -> dict[str, Any]:
        changes = self._variables(patch)
        if not changes:
            raise InvalidRequestError("Nothing to change: give server or tiers settings")
        async with self._lock:
            env_file = self._writable_env_file() if patch.persist else None
            try:
                updated = with_variables(self.settings, changes)
            except SettingsError as exc:
                raise InvalidRequestError(str(exc), param=_param_of(str(exc), changes)) from None
            if env_file is not None:  # before applying: a failed write leaves the server as it was
                try:
                    await asyncio.to_thread(write_variables, env_file, changes)
                except OSError as exc:
                    raise InvalidRequestError(
                        f"Could not write {env_file}: {exc.strerror or exc}", param="persist"
                    ) from None
            self._apply(updated, patch)
        view = self.view()
        view["changed"] = changes
        view["persisted"] = patch.persist
        # A process-environment variable wins over .env at the next start: say which would.
        view["overridden_by_environment"] = sorted(k for k in changes if k in os.environ) if patch.persist else []
        return view

    def _variables(self, patch: ConfigPatch) -> dict[str, str]:
        changes: dict[str, str] = {}
        # A field's default tells its JSON type; unset sampling fields (None) go by the built-in ones.
        server_defaults, tier_defaults, sampling = Settings(), TierSettings(), Sampling()
        names = [*patch.server, *patch.tiers, *(key for fields in patch.tiers.values() for key in fields)]
        if any(len(name) > _MAX_VALUE for name in names):
            raise InvalidRequestError(f"Setting names are at most {_MAX_VALUE} characters")  # errors echo them
        for key, value in patch.server.items():
            _check_live(key, LIVE_SERVER_FIELDS, Settings.__struct_fields__, f"server.{key}", key.upper())
            changes[key.upper()] = _text(value, f"server.{key}", getattr(server_defaults, key))
        for tier, fields in patch.tiers.items():
            if tier not in TIERS:
                param = f"tiers.{tier}"
                raise InvalidRequestError(f"Unknown tier {param} (tiers: {', '.join(TIERS)})", param=param)
            if self._registry.slots[tier].state is TierState.ABSENT:
                raise InvalidRequestError(
                    f"Tier {tier} has no model ({tier.upper()}_MODEL_PATH is not set)", param=f"tiers.{tier}"
                )
            for key, value in fields.items():
                param, variable = f"tiers.{tier}.{key}", f"{tier.upper()}_{key.upper()}"
                _check_live(key, LIVE_TIER_FIELDS, TierSettings.__struct_fields__, param, variable)
                default = getattr(tier_defaults, key)
                changes[variable] = _text(value, param, getattr(sampling, key) if default is None else default)
        return changes

    def _writable_env_file(self) -> Path:
        path = self._env_file
        if path is None or not path.is_file():
            # Creating one would also drop the built-in defaults the server falls back to without it.
            raise InvalidRequestError(
                "persist needs the .env file the server read at start, and it has none", param="persist"
            )
        return path

    def _apply(self, updated: Settings, patch: ConfigPatch) -> None:
        for tier, fields in patch.tiers.items():
            slot = self._registry.slots[tier]
            new = updated.tier(tier)
            self._registry.retune(slot, msgspec.structs.replace(slot.settings, **{k: getattr(new, k) for k in fields}))
        if "keep_alive" in {k for fields in patch.tiers.values() for k in fields}:
            self._lifecycle.retune()
        if "rate_limit_per_minute" in patch.server:
            self._security.set_rate_limit(updated.rate_limit_per_minute)
        self.settings = msgspec.structs.replace(
            updated, tiers={name: self._registry.slots[name].settings for name in updated.tiers}
        )


def _check_live(key: str, live: tuple[str, ...], known: tuple[str, ...], param: str, variable: str) -> None:
    if key in live:
        return
    if key in known and key not in ("name", "tiers"):
        raise InvalidRequestError(
            f"{param} cannot change while the server runs (live: {', '.join(live)}); set {variable} in .env and "
            "restart",
            param=param,
        )
    close = difflib.get_close_matches(key, live, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f" (live settings: {', '.join(live)})"
    raise InvalidRequestError(f"Unknown setting {param}{hint}", param=param)


def _text(value: Any, param: str, default: object) -> str:
    """A JSON value as `.env` would hold it, so the one parser checks it. JSON has types where
    `.env` has only text: a string for a numeric setting (`"0.3"`) is refused, not converted."""
    if isinstance(value, str) and isinstance(default, int | float) and not isinstance(default, bool):
        raise InvalidRequestError(f"{param} must be a JSON number, not the string {value[:_MAX_VALUE]!r}", param=param)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) or (isinstance(value, str) and len(value) <= _MAX_VALUE):
        return str(value)
    raise InvalidRequestError(f"{param} must be a number or a short string", param=param)


def _param_of(message: str, changes: dict[str, str]) -> str | None:
    """The body path of the variable a settings error names (`LIGHT_TOP_P` → `tiers.light.top_p`)."""
    for variable in changes:
        if f" {variable}=" in message or f" {variable} " in message:
            tier, _, field = variable.lower().partition("_")
            return f"tiers.{tier}.{field}" if tier in TIERS else f"server.{variable.lower()}"
    return None
