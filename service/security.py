"""Who may call what: browser pages, API keys, per-key rate limits, and what the load endpoint may open.

Keys and limits are off by default (a local server on 127.0.0.1), but the user's browser is a client
even then: any page it opens can send requests to localhost. So, always on: the `Host` header must
name this server (DNS rebinding sends the attacker's name), a page from another origin may not
act (`Origin` outside CORS_ORIGINS: 403; admin routes refuse every page), and request bodies must
be `Content-Type: application/json`, which a page cannot send without a CORS preflight.

`Security.guard` runs before every HTTP request's handler (the app's `before_request`) and at
every WebSocket handshake (a guard), so a rejected request never reaches a handler or parses its
body. Route handlers mark themselves with `opt={"public": True}` (no key, no limit: /health) or
`opt={"admin": True}` (needs an `ADMIN_API_KEYS` key whenever keys are on). Keys are compared as
SHA-256 digests with `hmac.compare_digest` against every configured key, and never logged or echoed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.handlers import BaseRouteHandler

from kernel.errors import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitError,
    UnsupportedMediaType,
)
from service.metrics import RateLimitInfo, RequestRecord, request_record
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
    keys) guard admin routes, which need one whenever any key is configured (with API_KEYS alone
    they are closed). With only ADMIN_API_KEYS set, the other routes stay open."""

    def __init__(self, keys: list[str], admin_keys: list[str]) -> None:
        self._user = [_digest(k) for k in dict.fromkeys(keys)]
        self._admin = [_digest(k) for k in dict.fromkeys(admin_keys)]
        self._any = self._user + self._admin

    @property
    def required(self) -> bool:
        """Every non-public route needs a key."""
        return bool(self._user)

    def check(self, authorization: str | None, *, admin: bool) -> str | None:
        """The presented key (to rate-limit by) or None when none is needed; raise 401 or 403."""
        if admin and self._any:
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
                "This endpoint needs an admin API key"
                + (" (ADMIN_API_KEYS)" if self._admin else "; set ADMIN_API_KEYS to use it"),
                code="admin_key_required",
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
    """Fixed one-minute windows per identity (an API key's digest, or a client address).

    Windows are kept in the order they started, so forgetting ended ones pops from the front:
    O(1) per request however many identities there are."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = per_minute
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def hit(self, identity: str) -> RateLimitInfo:
        """Count one request; `remaining` < 0 means it is over the limit."""
        now = self._clock()
        windows = self._windows
        while windows:
            oldest = next(iter(windows.values()))
            if now - oldest.started < _WINDOW:
                break
            windows.popitem(last=False)
        window = windows.get(identity)
        if window is None:
            window = windows[identity] = _Window(now, 0)
        reset = math.ceil(max(0.0, window.started + _WINDOW - now))
        if window.count >= self.limit:
            return RateLimitInfo(self.limit, -1, reset)
        window.count += 1
        return RateLimitInfo(self.limit, self.limit - window.count, reset)

    def __len__(self) -> int:
        return len(self._windows)


_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
_ANY_PORT = re.escape(":*")


def cors_config(settings: Settings) -> CORSConfig | None:
    """CORS_ORIGINS as Litestar's config: exact origins, `:*` for any port, `*` for every page.
    Never with credentials: the API authenticates with bearer keys, not cookies."""
    origins = _split(settings.cors_origins)
    if not origins:
        return None
    if "*" in origins:
        return CORSConfig(allow_origins=["*"], allow_credentials=False)
    patterns = [re.escape(o.rstrip("/").lower()).replace(_ANY_PORT, r"(?::\d+)?") for o in origins]
    return CORSConfig(allow_origins=[], allow_origin_regex="|".join(patterns), allow_credentials=False)


class BrowserPolicy:
    """Host and Origin checks against DNS rebinding and cross-site requests, and JSON-only bodies."""

    def __init__(self, host: str, allowed_hosts: list[str], cors: CORSConfig | None) -> None:
        names = {h.lower().strip("[]") for h in allowed_hosts}
        self._any_host = "*" in names
        self._names = names | {host.lower().strip("[]")} | _LOOPBACK_NAMES
        self._suffixes = tuple(n[1:] for n in names if n.startswith("*."))
        self._cors = cors

    @classmethod
    def from_settings(cls, settings: Settings) -> BrowserPolicy:
        return cls(settings.host, _split(settings.allowed_hosts), cors_config(settings))

    def host_allowed(self, host: str) -> bool:
        name = _host_name(host)
        if self._any_host or name in self._names or name.endswith(".localhost") or name.endswith(self._suffixes):
            return True
        try:  # an IP address cannot be rebound: DNS rebinding needs a name the attacker controls
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def check(self, connection: ASGIConnection[Any, Any, Any, Any], *, admin: bool) -> None:
        headers = connection.headers
        host = headers.get("host")
        if host is not None and not self.host_allowed(host):
            raise InvalidRequestError(
                f"Host {host[:100]!r} is not served here; add it to ALLOWED_HOSTS to allow it",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is None or _same_origin(origin, host):
            return
        if admin:
            raise PermissionDeniedError(
                "Admin routes do not accept requests from web pages (Origin header)", code="origin_not_allowed"
            )
        if self._cors is None or not self._cors.is_origin_allowed(origin.lower()):
            raise PermissionDeniedError(
                f"Origin {origin[:100]!r} may not use this server; add it to CORS_ORIGINS to allow it",
                code="origin_not_allowed",
            )

    @staticmethod
    def check_body(connection: ASGIConnection[Any, Any, Any, Any], *, multipart: bool = False) -> None:
        """Bodies must be JSON, so a page can only send one after a CORS preflight. File uploads
        (`multipart`) are the exception a form could send: the Origin check above still stops a page."""
        headers = connection.headers
        if connection.scope.get("method") not in ("POST", "PUT", "PATCH"):
            return
        content_type = headers.get("content-type")
        if content_type is None and headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers:
            return  # no body at all (`POST .../unload`); a page's such request still carries Origin
        media_type = (content_type or "").partition(";")[0].strip().lower()
        if media_type != "application/json" and not (multipart and media_type == "multipart/form-data"):
            raise UnsupportedMediaType(content_type or "")


def _host_name(host: str) -> str:
    """`example.com:8000` → `example.com`, `[::1]:8000` → `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() and ":" not in name else host.rstrip(".")


def _same_origin(origin: str, host: str | None) -> bool:
    _, _, netloc = origin.partition("://")
    return host is not None and bool(netloc) and netloc.lower() == host.strip().lower()


class Security:
    def __init__(self, keys: ApiKeys, limiter: RateLimiter | None, browser: BrowserPolicy) -> None:
        self.keys = keys
        self.limiter = limiter
        self.browser = browser

    @classmethod
    def from_settings(cls, settings: Settings) -> Security:
        keys = _split(settings.api_keys)
        if settings.api_keys_file:
            keys += read_keys_file(settings.api_keys_file)
        api_keys = ApiKeys(keys, _split(settings.admin_api_keys))
        check_bind(settings, api_keys)
        limiter = RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
        return cls(api_keys, limiter, BrowserPolicy.from_settings(settings))

    def set_rate_limit(self, per_minute: int) -> None:
        """RATE_LIMIT_PER_MINUTE changed live: counts in the current windows carry over."""
        if not per_minute:
            self.limiter = None
        elif self.limiter is None:
            self.limiter = RateLimiter(per_minute)
        else:
            self.limiter.limit = per_minute

    async def guard(self, connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        """Async though it never awaits: Litestar runs a sync guard on a worker thread, a thread hop
        (~0.2-1 ms, more on a busy machine) before every request's handler."""
        scope = connection.scope
        admin = bool(handler.opt.get("admin"))
        self.browser.check(connection, admin=admin)
        if (scope["type"] == ScopeType.HTTP and scope["method"] == "OPTIONS") or handler.opt.get("public"):
            return  # CORS preflights carry no credentials; /health is for load balancers
        if scope["type"] == ScopeType.WEBSOCKET:
            return  # the key may come in the first message: the WebSocket session checks it and counts each request
        key = self.keys.check(connection.headers.get("authorization"), admin=admin)
        self.throttle(key, connection.scope.get("client"), request_record(connection.scope), admin=admin)
        self.browser.check_body(connection, multipart=bool(handler.opt.get("multipart")))

    def throttle(
        self, key: str | None, client: tuple[str, int] | None, record: RequestRecord, *, admin: bool = False
    ) -> None:
        """Count one request against RATE_LIMIT_PER_MINUTE (per key, else per client address), note
        it on `record` for the rate-limit headers, and raise 429 over the limit. Admin routes count
        in a bucket of their own: traffic that exhausted the limit must not lock out the route
        (`PATCH /v1/config`) that lifts it, with keys off as with keys on."""
        if self.limiter is None:
            return
        identity = "key:" + _digest(key).hex() if key else "ip:" + (client[0] if client else "unknown")
        identity = "admin:" + identity if admin else identity
        info = self.limiter.hit(identity)
        record.rate_limit = RateLimitInfo(info.limit, max(0, info.remaining), info.reset)
        if info.remaining < 0:
            raise RateLimitError(
                f"Rate limit of {info.limit} requests per minute exceeded; retry in {info.reset} s",
                retry_after=max(1, info.reset),
            )


def check_bind(settings: Settings, keys: ApiKeys) -> None:
    """Refuse to serve other machines without keys, unless the operator says so explicitly."""
    host = settings.host.strip("[]")
    loopback = host == "localhost"
    with contextlib.suppress(ValueError):  # a name, not an address
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    if not loopback and not keys.required and not settings.allow_insecure_bind:
        raise SettingsError(
            f"HOST={settings.host} serves other machines but no API key is set: set API_KEYS (or "
            "API_KEYS_FILE), or ALLOW_INSECURE_BIND=true to serve without keys"
        )


def allowed_model_path(models_dir: str, given: str, *, param: str = "model_path") -> str:
    """`given` as an existing file or folder inside MODELS_DIR, else 403 (400 if it is missing).

    Relative paths are taken from MODELS_DIR; `..` is refused outright, so a request can only name
    what lies under that folder (symlinks in it were put there by the operator and are followed).
    The load endpoint thus never opens an arbitrary file."""
    if not models_dir:
        raise PermissionDeniedError(
            "Loading a model by path is disabled: set MODELS_DIR to the folder models may come from",
            param=param,
        )
    root = Path(os.path.abspath(Path(models_dir).expanduser()))
    candidate = Path(given).expanduser()
    if ".." in candidate.parts or "\x00" in given:
        raise PermissionDeniedError(f"{param} must not contain '..'", param=param)
    target = Path(os.path.abspath(candidate if candidate.is_absolute() else root / candidate))
    inside = target.is_relative_to(root) or target.is_relative_to(root.resolve())
    if not inside or target in (root, root.resolve()):
        raise PermissionDeniedError(f"{param} must be a file or folder inside MODELS_DIR", param=param)
    if not target.exists():
        raise InvalidRequestError(f"No such model in MODELS_DIR: {given}", param=param, code="model_not_found")
    return str(target)


def check_batch_size(count: int, settings: Settings, *, param: str = "input") -> None:
    """400 when an embedding/rerank request carries more than MAX_BATCH_INPUTS items."""
    if count > settings.max_batch_inputs:
        raise InvalidRequestError(
            f"Too many items: {count} (MAX_BATCH_INPUTS is {settings.max_batch_inputs})", param=param
        )
