"""The prompt cache's tiers (backends/prompt_cache.py) on plain byte blobs: longest-prefix
lookup, LRU within the RAM and disk budgets, the disk index rebuilt on start, and files that are
corrupt, truncated or of another model ignored with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from backends.prompt_cache import PromptCache


def tokens(start: int, n: int = 100) -> tuple[int, ...]:
    return tuple(range(start, start + n))


def blob(fill: int, size: int = 1000) -> list[bytes]:
    return [bytes([fill]) * size, bytes([fill + 1]) * 10]


def disk_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.prompt"))


def test_longest_prefix_from_ram_then_from_disk_after_a_restart(tmp_path: Path) -> None:
    cache = PromptCache("model-a", 10_000, str(tmp_path), 10_000)
    cache.put(tokens(0), blob(1), [42])
    cache.put(tokens(0, 50), blob(3), [7])
    entry, n = cache.longest([*tokens(0, 80), 999], limit=1000)
    assert entry is not None and n == 80 and entry.tokens == tokens(0)
    assert cache.take(entry) == blob(1)
    entry, n = cache.longest([*tokens(0, 40), 999], limit=30)
    assert entry is not None and n == 30
    assert cache.longest([5000], 10) == (None, 0)
    cache.close()

    again = PromptCache("model-a", 10_000, str(tmp_path), 10_000)
    entry, n = again.longest(list(tokens(0)), limit=100)
    assert entry is not None and n == 100 and entry.meta == [42]
    assert again.take(entry) == blob(1)
    stats = again.stats()
    assert stats["disk"]["hits"] == 1 and stats["disk"]["entries"] == 2 and stats["ram"]["entries"] == 1
    again.clear()
    assert not list(tmp_path.glob("*.prompt"))
    assert again.stats()["disk"]["entries"] == again.stats()["ram"]["entries"] == 0
    again.close()


def test_budgets_are_kept_least_recently_used_first(tmp_path: Path) -> None:
    # Each entry: 1010 bytes of blobs + 400 of tokens in RAM, plus a header on disk.
    cache = PromptCache("m", 3000, str(tmp_path), 3500)
    for i in range(5):
        cache.put(tokens(1000 * i), blob(i), [])
        cache.flush()
        assert disk_size(tmp_path) <= 3500
    stats = cache.stats()
    assert stats["ram"]["entries"] == 2 and stats["ram"]["bytes"] <= 3000 and stats["ram"]["evictions"] == 3
    assert stats["disk"]["entries"] == 2 and stats["disk"]["evictions"] == 3
    assert stats["disk"]["bytes"] == disk_size(tmp_path)
    entry, _ = cache.longest(list(tokens(0)), 100)
    assert entry is None  # the oldest went from both tiers
    cache.close()
    smaller = PromptCache("m", 3000, str(tmp_path), 2000)  # a lowered budget applies on start
    assert disk_size(tmp_path) <= 2000 and smaller.stats()["disk"]["entries"] == 1
    smaller.close()


def test_corrupt_truncated_and_foreign_files_are_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = PromptCache("model-b", 10_000, str(tmp_path), 10_000)
    other.put(tokens(0), blob(1), [])
    other.close()
    ours = PromptCache("model-a", 10_000, str(tmp_path), 10_000)
    ours.put(tokens(500), blob(2), [])
    ours.put(tokens(900), blob(4), [])
    ours.close()
    assert len(list(tmp_path.glob("*.prompt"))) == 3
    (tmp_path / "garbage.prompt").write_bytes(b"not a cache file at all")
    truncated, flipped = (tmp_path / f"{ours.key(tokens(start))}.prompt" for start in (500, 900))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF  # the same size, a payload byte changed: found only by the checksum
    flipped.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="backends.prompt_cache"):
        cache = PromptCache("model-a", 10_000, str(tmp_path), 10_000)
        assert cache.longest(list(tokens(0)), 100) == (None, 0)  # model-b's
        assert cache.longest(list(tokens(500)), 100) == (None, 0)  # truncated
        entry, n = cache.longest(list(tokens(900)), 100)
        assert entry is not None and n == 100
        assert cache.take(entry) is None  # checksum mismatch: a miss, forgotten
        assert cache.longest(list(tokens(900)), 100) == (None, 0)
    text = caplog.text
    assert "another model" in text and "garbage.prompt" in text and "checksum" in text and "header says" in text
    cache.close()
