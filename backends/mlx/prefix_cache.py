"""The MLX engine's prefix cache: KV states of recent sequences, reused by longest common prefix."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from backends.base import common_prefix


@dataclass(slots=True)
class _Entry:
    tokens: list[int]
    cache: list[Any]


class PrefixCache:
    """The KV caches of the last few sequences (prompt + generated), reused by longest prefix.

    Multi-turn chat re-sends the whole history: the previous turn's cache covers most of it.
    A cache whose tokens are a prefix of the new prompt is taken and extended in place (the new
    sequence supersedes it); one that diverges is copied and trimmed back to the shared part.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: list[_Entry] = []  # oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def sequences(self) -> list[list[int]]:
        """The token sequences held, oldest first (copies; for stats and tests)."""
        return [list(e.tokens) for e in self._entries]

    def fetch(self, prompt: Sequence[int]) -> tuple[list[Any] | None, int]:
        """Return (a cache holding the first n prompt tokens, n), or (None, 0)."""
        best: tuple[int, int] | None = None  # (reusable tokens, entry index)
        for i, entry in enumerate(self._entries):
            shared = common_prefix(entry.tokens, prompt)
            # At least one prompt token must still run through the model to give logits.
            usable = min(shared, len(prompt) - 1)
            extends = usable == len(entry.tokens)
            if usable > 0 and (extends or can_trim_prompt_cache(entry.cache)) and (best is None or usable > best[0]):
                best = (usable, i)
        if best is None:
            return None, 0
        usable, i = best
        entry = self._entries[i]
        if usable == len(entry.tokens):
            del self._entries[i]
            return entry.cache, usable
        self._entries.append(self._entries.pop(i))  # most recently used
        cache = copy.deepcopy(entry.cache)
        trim_prompt_cache(cache, len(entry.tokens) - usable)
        return cache, usable

    def store(self, tokens: list[int], cache: list[Any]) -> None:
        if self.capacity <= 0 or not tokens:
            return
        size = _cache_offset(cache)
        if size is not None and size != len(tokens):
            # Should not happen; never keep a cache whose contents we cannot name.
            if size < len(tokens) or not can_trim_prompt_cache(cache):
                return
            trim_prompt_cache(cache, size - len(tokens))
        if can_trim_prompt_cache(cache):
            # A trimmable cache can stand in for any of its prefixes: drop those.
            self._entries = [e for e in self._entries if tokens[: len(e.tokens)] != e.tokens]
        else:
            self._entries = [e for e in self._entries if e.tokens != tokens]
        self._entries.append(_Entry(tokens, cache))
        del self._entries[: -self.capacity]


def _cache_offset(cache: list[Any]) -> int | None:
    """Tokens held by a KV-style cache, or None for caches that do not count them (SSM state)."""
    for layer in cache:
        offset = getattr(layer, "offset", None)
        if isinstance(offset, int):
            return offset
    return None
