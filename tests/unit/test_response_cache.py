"""The response cache on its own: LRU order, TTL, keys, persistence and bad files."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import pytest

from backends.base import GenerationRequest
from kernel.config import TierSettings
from service.cache import FILE_NAME, CachedGeneration, ResponseCache
from service.tiers.slots import TierSlot, TierState


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def slot(path: str = "/m/a.gguf", name: str = "light") -> TierSlot:
    return TierSlot(name, TierSettings(name=name, model_path=path), TierState.AVAILABLE, model="a")


def cache(tmp_path: Path | None = None, clock: Clock | None = None, **kw: int) -> ResponseCache:
    return ResponseCache(
        enabled=True,
        max_entries=kw.get("max_entries", 3),
        ttl_seconds=kw.get("ttl", 0),
        path=tmp_path / FILE_NAME if tmp_path else None,
        clock=clock or Clock(),
    )


def test_key_covers_every_output_parameter() -> None:
    c = cache()
    base = GenerationRequest(prompt="hi", temperature=0.0, max_tokens=8)
    key = c.key("completions", slot(), base)
    assert key == c.key("completions", slot(), GenerationRequest(prompt="hi", temperature=0.0, max_tokens=8))
    variants = [
        GenerationRequest(prompt="ho", temperature=0.0, max_tokens=8),
        GenerationRequest(prompt="hi", temperature=0.0, max_tokens=9),
        GenerationRequest(prompt="hi", temperature=0.0, max_tokens=8, top_k=5),
        GenerationRequest(prompt="hi", temperature=0.0, max_tokens=8, stop=("x",)),
        GenerationRequest(prompt="hi", temperature=0.0, max_tokens=8, seed=1),
        GenerationRequest(messages=({"role": "user", "content": "hi"},), temperature=0.0, max_tokens=8),
    ]
    keys = {c.key("completions", slot(), v) for v in variants}
    assert key not in keys and len(keys) == len(variants)
    assert c.key("chat", slot(), base) != key  # the kind of request
    assert c.key("completions", slot(path="/m/b.gguf"), base) != key  # another model file, same name
    assert c.key("completions", slot(name="medium"), base) != key


def test_disabled_cache_has_no_keys() -> None:
    off = ResponseCache(enabled=False, max_entries=10, ttl_seconds=0)
    assert off.key("chat", slot(), "x") is None
    off.put(None, "value")
    assert off.get(None, str) is None and off.stats()["entries"] == 0
    assert ResponseCache(enabled=True, max_entries=0, ttl_seconds=0).key("chat", slot(), "x") is None


def test_lru_evicts_the_least_recently_used() -> None:
    c = cache(max_entries=2)
    a, b, d = (c.key("chat", slot(), n) for n in "abd")
    c.put(a, "A")
    c.put(b, "B")
    assert c.get(a, str) == "A"  # a is now the most recent
    c.put(d, "D")
    assert c.get(b, str) is None and c.get(a, str) == "A" and c.get(d, str) == "D"
    stats = c.stats()
    assert stats["entries"] == 2 and stats["evictions"] == 1
    assert (stats["hits"], stats["misses"]) == (3, 1) and stats["hit_rate"] == 0.75
    assert stats["by_kind"] == {"chat": {"hits": 3, "misses": 1}}


def test_ttl_expires_entries() -> None:
    clock = Clock()
    c = cache(clock=clock, ttl=10)
    key = c.key("chat", slot(), "q")
    c.put(key, "v")
    clock.now += 9.9
    assert c.get(key, str) == "v"
    clock.now += 0.2
    assert c.get(key, str) is None
    assert c.stats()["expirations"] == 1 and c.stats()["entries"] == 0 and c.stats()["bytes"] == 0


def test_bytes_and_clear() -> None:
    c = cache()
    key = c.key("chat", slot(), "q")
    c.put(key, CachedGeneration(["Hello", " world"], "stop", 3, 2))
    assert c.stats()["bytes"] > len("Hello world")
    assert c.get(key, CachedGeneration) == CachedGeneration(["Hello", " world"], "stop", 3, 2)
    assert c.clear() == 1 and c.stats()["bytes"] == 0 and c.get(key, CachedGeneration) is None


def test_through_computes_once() -> None:
    c = cache()
    calls: list[int] = []

    async def compute() -> list[float]:
        calls.append(1)
        return [0.5, 0.25]

    async def run() -> None:
        key = c.key("embeddings", slot(), ["text"])
        assert await c.through(key, list[float], compute) == [0.5, 0.25]
        assert await c.through(key, list[float], compute) == [0.5, 0.25]

    asyncio.run(run())
    assert len(calls) == 1


def test_persisted_atomically_and_reloaded(tmp_path: Path) -> None:
    clock = Clock()
    first = cache(tmp_path, clock, ttl=100)
    live, stale = first.key("chat", slot(), "live"), first.key("chat", slot(), "stale")

    async def write() -> None:
        await first.open()
        first.put(stale, "old")
        clock.now += 60
        first.put(live, "new")
        await first.close()

    asyncio.run(write())
    assert (tmp_path / FILE_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]  # no temp file left behind
    clock.now += 50  # `stale` (stored 110 s ago, TTL 100) expired while the server was down
    second = cache(tmp_path, clock, ttl=100)
    asyncio.run(second.open())
    assert second.get(live, str) == "new" and second.get(stale, str) is None
    assert second.stats()["entries"] == 1


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xffnot msgpack at all",
        msgspec.msgpack.encode({"format": "someone-else", "version": 1, "entries": []}),
        msgspec.msgpack.encode([1, 2, 3]),
        b"",
    ],
    ids=["garbage", "foreign-format", "wrong-shape", "empty"],
)
def test_corrupt_or_foreign_file_is_logged_and_ignored(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / FILE_NAME).write_bytes(content)
    c = cache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="service.cache"):
        asyncio.run(c.open())
    assert c.stats()["entries"] == 0
    assert any("ignoring it" in r.getMessage() for r in caplog.records)
    key = c.key("chat", slot(), "q")
    c.put(key, "v")
    asyncio.run(c.close())  # replaced by a valid file
    again = cache(tmp_path)
    asyncio.run(again.open())
    assert again.get(key, str) == "v"


def test_dispatcher_cached_for_embedding_style_endpoints() -> None:
    from service.metrics import RequestRecord
    from service.serving.dispatch import Dispatcher
    from service.settings import parse_settings

    settings = parse_settings({"ENABLE_CACHE": "true"})
    dispatch = Dispatcher(ResponseCache.from_settings(settings))
    calls: list[str] = []

    async def compute() -> dict[str, list[float]]:
        calls.append("x")
        return {"vector": [0.5, 0.25]}

    async def request() -> tuple[dict[str, list[float]], RequestRecord]:
        record = RequestRecord("/v1/embeddings", "POST")
        payload = {"input": ["a", "b"], "dimensions": 2}
        return await dispatch.cached("embeddings", slot(), payload, dict[str, list[float]], record, compute), record

    first, miss = asyncio.run(request())
    second, hit = asyncio.run(request())
    assert first == second == {"vector": [0.5, 0.25]} and calls == ["x"]
    assert (miss.cache, hit.cache, hit.tier) == ("miss", "hit", "light")
    assert dispatch.cache.stats()["by_kind"] == {"embeddings": {"hits": 1, "misses": 1}}
