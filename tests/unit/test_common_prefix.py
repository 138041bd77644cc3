"""`common_prefix` (prefix reuse in both engines' KV caches) against the plain definition."""

from __future__ import annotations

import random

from backends.base import common_prefix


def reference(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_common_prefix_finds_the_first_difference_at_every_position() -> None:
    rng = random.Random(0)
    for size in (0, 1, 2, 15, 16, 17, 100, 1000, 5000):
        a = [rng.randrange(4) for _ in range(size)]
        for cut in {0, size // 3, size // 2, size - 1, size}:
            if cut < 0:
                continue
            b = a[:cut] + [rng.randrange(4) for _ in range(rng.randrange(0, 50))]
            assert common_prefix(a, b) == common_prefix(b, a) == reference(a, b)
    assert common_prefix([1, 2, 3], (1, 2, 4)) == 2  # a tuple against a list: values, not types
