"""The response cache: LRU + TTL over normalised requests, optionally persisted to disk.

Values are stored msgpack-encoded, so a hit costs one dict lookup and one decode, `bytes` in the
stats are real, and the file on disk is plain data (never pickle: a cache file is not trusted
code). Everything runs on the event loop thread; only the file write happens in a worker thread.

Usage (the key is None when caching is off, and then nothing is cached):

    key = cache.key("embeddings", slot, (inputs, dimensions))
    batch = await cache.through(key, EmbeddingBatch, lambda: EMBEDDING.embed(slot, request))
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec

from service.disk import write_atomic
from service.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

_FORMAT = "llmservice.response-cache"
_VERSION = 1
FILE_NAME = "response-cache.msgpack"
_FLUSH_SECONDS = 30.0  # a crash loses at most this much of a persisted cache


class CachedGeneration(msgspec.Struct, array_like=True):
    """A finished generation: its text pieces as they were streamed, finish reason and usage."""

    pieces: list[str]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class Model(Protocol):
    """What answers a request (a tier's slot): everything about it that decides its outputs."""

    def cache_identity(self) -> tuple[Any, ...]: ...


class _CacheFile(msgspec.Struct):
    format: str
    version: int
    entries: list[tuple[str, float, bytes]]  # key, expiry (wall clock, 0 = never), value, oldest first


@dataclass(slots=True)
class _Entry:
    value: bytes
    expires: float  # wall clock; math.inf = never


@dataclass(slots=True)
class KindCounts:
    hits: int = 0
    misses: int = 0


class ResponseCache:
    def __init__(
        self,
        *,
        enabled: bool,
        max_entries: int,
        ttl_seconds: float,
        path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.enabled = enabled and max_entries > 0
        self.max_entries = max_entries
        self.ttl = ttl_seconds
        self.path = path
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self.counts: dict[str, KindCounts] = {}  # per kind: chat, completions, embeddings, rerank
        self.evictions = 0
        self.expirations = 0
        self._dirty = False
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ResponseCache:
        path = Path(settings.cache_dir).expanduser() / FILE_NAME if settings.cache_persist_to_disk else None
        return cls(
            enabled=settings.enable_cache,
            max_entries=settings.cache_max_size,
            ttl_seconds=settings.cache_ttl_seconds,
            path=path,
        )

    # -- keys and lookups ------------------------------------------------------------------
    def key(self, kind: str, model: Model, payload: Any) -> str | None:
        """A digest of everything that decides the output: the kind of request, the model (a tier's
        id, file, template, context) and `payload` (any msgspec-encodable request: a struct,
        dataclass, tuple, dict...). None when caching is off."""
        if not self.enabled:
            return None
        identity = model.cache_identity()
        return kind + ":" + hashlib.sha256(msgspec.msgpack.encode((kind, identity, payload))).hexdigest()

    def get(self, key: str | None, type_: type[T]) -> T | None:
        """The cached value for `key` (and a hit), or None (and a miss)."""
        if key is None:
            return None
        counts = self.counts.setdefault(key.partition(":")[0], KindCounts())
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= self._clock():
            self._drop(key)
            self.expirations += 1
            entry = None
        if entry is None:
            counts.misses += 1
            return None
        try:
            value = msgspec.msgpack.decode(entry.value, type=type_)
        except (msgspec.DecodeError, msgspec.ValidationError):  # another type under a colliding key
            self._drop(key)
            counts.misses += 1
            return None
        self._entries.move_to_end(key)
        counts.hits += 1
        return value

    def put(self, key: str | None, value: Any) -> None:
        if key is None:
            return
        data = msgspec.msgpack.encode(value)
        self._drop(key)
        self._insert(key, _Entry(data, self._clock() + self.ttl if self.ttl > 0 else math.inf))
        self._dirty = True

    async def through(self, key: str | None, type_: type[T], compute: Callable[[], Awaitable[T]]) -> T:
        """The cached value, or `compute()`'s result, stored for next time."""
        if (hit := self.get(key, type_)) is not None:
            return hit
        value = await compute()
        self.put(key, value)
        return value

    def clear(self) -> int:
        cleared = len(self._entries)
        self._entries.clear()
        self._bytes = 0
        self._dirty = True
        return cleared

    def stats(self) -> dict[str, Any]:
        hits = sum(c.hits for c in self.counts.values())
        misses = sum(c.misses for c in self.counts.values())
        return {
            "enabled": self.enabled,
            "hits": hits,
            "misses": misses,
            "hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0,
            "entries": len(self._entries),
            "bytes": self._bytes,
            "max_entries": self.max_entries,
            "ttl_seconds": self.ttl,
            "evictions": self.evictions,
            "expirations": self.expirations,
            "persisted_to": str(self.path) if self.path else None,
            "by_kind": {k: {"hits": c.hits, "misses": c.misses} for k, c in sorted(self.counts.items())},
        }

    def _insert(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        self._bytes += len(key) + len(entry.value)
        while len(self._entries) > self.max_entries:
            old_key, old = self._entries.popitem(last=False)
            self._bytes -= len(old_key) + len(old.value)
            self.evictions += 1

    def _drop(self, key: str) -> None:
        if (old := self._entries.pop(key, None)) is not None:
            self._bytes -= len(key) + len(old.value)

    # -- persistence -------------------------------------------------------------------------
    async def open(self) -> None:
        """Reload the persisted cache and start flushing it periodically."""
        if not (self.enabled and self.path):
            return
        entries = await asyncio.to_thread(_read, self.path)
        now = self._clock()
        for key, expires, value in entries:
            if expires == 0 or expires > now:
                self._insert(key, _Entry(value, expires or math.inf))
        if entries:
            log.info("Response cache: %d entries reloaded from %s", len(self._entries), self.path)
        self._flusher = asyncio.create_task(self._flush_periodically(), name="response-cache-flush")

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()

    async def flush(self) -> None:
        if not (self.enabled and self.path and self._dirty):
            return
        entries = [(k, 0.0 if math.isinf(e.expires) else e.expires, e.value) for k, e in self._entries.items()]
        data = msgspec.msgpack.encode(_CacheFile(_FORMAT, _VERSION, entries))
        self._dirty = False
        try:
            await asyncio.to_thread(write_atomic, self.path, data)
        except OSError as exc:
            self._dirty = True
            log.warning("Response cache: could not write %s: %s", self.path, exc)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_SECONDS)
            await self.flush()


def _read(path: Path) -> list[tuple[str, float, bytes]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("Response cache: cannot read %s (%s); starting empty", path, exc)
        return []
    try:
        file = msgspec.msgpack.decode(data, type=_CacheFile)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("Response cache: %s is corrupt or not a cache file (%s); ignoring it", path, exc)
        return []
    if file.format != _FORMAT or file.version != _VERSION:
        log.warning("Response cache: %s has format %s v%d, not ours; ignoring it", path, file.format, file.version)
        return []
    return file.entries
