"""Who may call what: API keys, per-key rate limits, and what the load endpoint may open.

All off by default (a local server on 127.0.0.1). `Security.guard` is an app-wide Litestar guard,
so a rejected request never reaches a handler or parses its body. Route handlers mark themselves
with `opt={"public": True}` (no key, no limit: /health) or `opt={"admin": True}` (needs an
`ADMIN_API_KEYS` key when those are set). Keys are compared as SHA-256 digests with
`hmac.compare_digest` against every configured key, and never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.handlers import BaseRouteHandler

from kernel.errors import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitError,
)
from service.metrics import RateLimitInfo, request_record
from service.settings import Settings, SettingsError

_WINDOW = 60.0


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _split(value: str) -> list[str]:
    return [k.strip() for k in value.split(",") if k.strip()]


def read_keys_file(path: str) -> list[str]:
    """One key per line; blank lines and `#` comments are skipped."""
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as exc:
        raise SettingsError(f"Invalid setting API_KEYS_FILE={path!r}: {exc.strerror or exc}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class ApiKeys:
    """API_KEYS guard every route but the public ones; ADMIN_API_KEYS (which also work as user
    keys) guard admin routes. With only ADMIN_API_KEYS set, the other routes stay open."""

    def __init__(self, keys: list[str], admin_keys: list[str]) -> None:
        self._user = [_digest(k) for k in dict.fromkeys(keys)]
        self._admin = [_digest(k) for k in dict.fromkeys(admin_keys)]
        self._any = self._user + self._admin

    def check(self, authorization: str | None, *, admin: bool) -> str | None:
        """The presented key (to rate-limit by) or None when none is needed; raise 401 or 403."""
        if admin and self._admin:
            accepted = self._admin
        elif self._user:
            accepted = self._any
        else:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        digest = _digest(token)
        if not _matches(digest, self._any):
            raise AuthenticationError("Incorrect API key provided", code="invalid_api_key")
        if not _matches(digest, accepted):
            raise PermissionDeniedError(
                "This endpoint needs an admin API key (ADMIN_API_KEYS)", code="admin_key_required"
            )
        return token


def _matches(digest: bytes, candidates: list[bytes]) -> bool:
    found = False
    for candidate in candidates:  # no early exit: the time taken does not depend on which key matched
        found |= hmac.compare_digest(digest, candidate)
    return found


@dataclass(slots=True)
class _Window:
    started: float
    count: int


class RateLimiter:
    """Fixed one-minute windows per identity (an API key's digest, or a client address)."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = per_minute
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def hit(self, identity: str) -> RateLimitInfo:
        """Count one request; `remaining` < 0 means it is over the limit."""
        now = self._clock()
        if len(self._windows) > 10_000:  # forget identities whose window has ended
            self._windows = {k: w for k, w in self._windows.items() if now - w.started < _WINDOW}
        window = self._windows.get(identity)
        if window is None or now - window.started >= _WINDOW:
            window = self._windows[identity] = _Window(now, 0)
        reset = math.ceil(max(0.0, window.started + _WINDOW - now))
        if window.count >= self.limit:
            return RateLimitInfo(self.limit, -1, reset)
        window.count += 1
        return RateLimitInfo(self.limit, self.limit - window.count, reset)


class Security:
    def __init__(self, keys: ApiKeys, limiter: RateLimiter | None) -> None:
        self.keys = keys
        self.limiter = limiter

    @classmethod
    def from_settings(cls, settings: Settings) -> Security:
        keys = _split(settings.api_keys)
        if settings.api_keys_file:
            keys += read_keys_file(settings.api_keys_file)
        limiter = RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
        return cls(ApiKeys(keys, _split(settings.admin_api_keys)), limiter)

    def guard(self, connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        scope = connection.scope
        if (scope["type"] == ScopeType.HTTP and scope["method"] == "OPTIONS") or handler.opt.get("public"):
            return  # CORS preflights carry no credentials; /health is for load balancers
        key = self.keys.check(connection.headers.get("authorization"), admin=bool(handler.opt.get("admin")))
        if self.limiter is None:
            return
        client = connection.scope.get("client")
        identity = "key:" + _digest(key).hex() if key else "ip:" + (client[0] if client else "unknown")
        info = self.limiter.hit(identity)
        request_record(connection.scope).rate_limit = RateLimitInfo(info.limit, max(0, info.remaining), info.reset)
        if info.remaining < 0:
            raise RateLimitError(
                f"Rate limit of {info.limit} requests per minute exceeded; retry in {info.reset} s",
                retry_after=max(1, info.reset),
            )


def allowed_model_path(models_dir: str, given: str) -> str:
    """`given` as an existing file or folder inside MODELS_DIR, else 403 (400 if it is missing).

    Relative paths are taken from MODELS_DIR; `..` is refused outright, so a request can only name
    what lies under that folder (symlinks in it were put there by the operator and are followed).
    The load endpoint thus never opens an arbitrary file."""
    if not models_dir:
        raise PermissionDeniedError(
            "Loading a model by path is disabled: set MODELS_DIR to the folder models may come from",
            param="model_path",
        )
    root = Path(os.path.abspath(Path(models_dir).expanduser()))
    candidate = Path(given).expanduser()
    if ".." in candidate.parts or "\x00" in given:
        raise PermissionDeniedError("model_path must not contain '..'", param="model_path")
    target = Path(os.path.abspath(candidate if candidate.is_absolute() else root / candidate))
    inside = target.is_relative_to(root) or target.is_relative_to(root.resolve())
    if not inside or target in (root, root.resolve()):
        raise PermissionDeniedError("model_path must be a file or folder inside MODELS_DIR", param="model_path")
    if not target.exists():
        raise InvalidRequestError(f"No such model in MODELS_DIR: {given}", param="model_path", code="model_not_found")
    return str(target)


def check_batch_size(count: int, settings: Settings, *, param: str = "input") -> None:
    """400 when an embedding/rerank request carries more than MAX_BATCH_INPUTS items."""
    if count > settings.max_batch_inputs:
        raise InvalidRequestError(
            f"Too many items: {count} (MAX_BATCH_INPUTS is {settings.max_batch_inputs})", param=param
        )
