"""The decoded-image cache (service/serving/images.py): bounded in pixel bytes, least recently used
out first, each image kept IMAGE_CACHE_SECONDS after it was last sent."""

from __future__ import annotations

import pytest

from backends.base import ImageInput
from service.serving import images
from service.serving.images import _DecodedImages


def image(name: str, size: int) -> ImageInput:
    return ImageInput(1, size // 3, b"\0" * size, name)


def test_the_least_recently_used_go_first_within_the_budget() -> None:
    cache = _DecodedImages(max_bytes=300, ttl=60)
    for name in "abc":
        cache.put(image(name, 100))
    assert cache.get("a") is not None  # now the most recently used
    cache.put(image("d", 100))
    assert [n for n in "abcd" if cache.get(n) is not None] == ["a", "c", "d"]
    cache.put(image("huge", 301))  # larger than the whole budget: never kept, nothing evicted for it
    assert cache.get("huge") is None and cache.get("a") is not None
    cache.put(image("c", 100))  # the same image again replaces itself
    assert [n for n in "acd" if cache.get(n) is not None] == ["a", "c", "d"]


def test_images_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return now[0]

    monkeypatch.setattr(images, "time", Clock)
    cache = _DecodedImages(max_bytes=1000, ttl=60)
    cache.put(image("a", 100))
    now[0] += 30
    cache.put(image("b", 100))
    now[0] += 31
    assert cache.get("a") is None and cache.get("b") is not None  # b is kept 60 s more
    now[0] += 59
    cache.put(image("c", 100))
    assert cache.get("b") is not None
    now[0] += 61
    cache.put(image("d", 100))  # expired entries leave as new ones come
    assert cache.get("b") is None and cache.get("c") is None and cache.get("d") is not None


def test_a_zero_budget_keeps_nothing() -> None:
    cache = _DecodedImages(max_bytes=0, ttl=60)
    cache.put(image("a", 3))
    assert cache.get("a") is None
