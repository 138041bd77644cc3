"""The MLX engine's prefix cache: KV states of recent sequences, reused by longest common prefix,
with the prompt cache tiers (RAM, disk) behind it for the sequences it lets go."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from backends.base import common_prefix
from backends.mlx.cache_state import MlxState, restore, snapshot
from backends.prompt_cache import StateStore

MlxPromptCache = StateStore[MlxState]


@dataclass(slots=True)
class _Entry:
    tokens: list[int]
    cache: list[Any]


class PrefixCache:
    """The KV caches of the last few sequences (prompt + generated), reused by longest prefix.

    Multi-turn chat re-sends the whole history: the previous turn's cache covers most of it.
    A cache whose tokens are a prefix of the new prompt is taken and extended in place (the new
    sequence supersedes it); one that diverges is copied and trimmed back to the shared part.
    With `tiers`, a sequence evicted past `capacity` goes there, and a prompt sharing more with
    a cached one than with any entry here starts from that one.
    """

    def __init__(self, capacity: int, tiers: MlxPromptCache | None = None) -> None:
        self.capacity = capacity
        self.tiers = tiers if tiers is not None and tiers.enabled else None
        self._entries: list[_Entry] = []  # oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every entry, the tiers' included."""
        self._entries.clear()
        if self.tiers is not None:
            self.tiers.clear()

    def close(self) -> None:
        """Let the entries go to the tiers (with a disk tier they survive a restart), then stop the writer."""
        if self.tiers is not None:
            if self.tiers.disk_budget:
                for entry in self._entries:
                    self._save(entry)
            self.tiers.close()
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
        if self.tiers is not None:
            found = self._from_tiers(prompt, 0 if best is None else best[0])
            if found is not None:
                return found
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
        if not tokens:
            return
        size = _cache_offset(cache)
        if size is not None and size != len(tokens):
            # Should not happen; never keep a cache whose contents we cannot name.
            if size < len(tokens) or not can_trim_prompt_cache(cache):
                return
            trim_prompt_cache(cache, size - len(tokens))
        if self.capacity <= 0:  # kept nowhere here: straight to the tiers, if any
            if self.tiers is not None:
                self._save(_Entry(tokens, cache))
            return
        if can_trim_prompt_cache(cache):
            # A trimmable cache can stand in for any of its prefixes: drop those.
            self._entries = [e for e in self._entries if tokens[: len(e.tokens)] != e.tokens]
        else:
            self._entries = [e for e in self._entries if e.tokens != tokens]
        self._entries.append(_Entry(tokens, cache))
        for gone in self._entries[: -self.capacity]:
            self._save(gone)
        del self._entries[: -self.capacity]

    def _from_tiers(self, prompt: Sequence[int], live: int) -> tuple[list[Any], int] | None:
        """A cache from the tiers when they hold more of `prompt` than the `live` tokens an entry here gives."""
        assert self.tiers is not None
        entry, n = self.tiers.longest(list(prompt), len(prompt) - 1)
        state = self.tiers.take(entry) if entry is not None and n > live else None
        if entry is None or state is None:
            self.tiers.miss()
            return None
        cache = restore(state)
        trim_prompt_cache(cache, len(entry.tokens) - n)
        return cache, n

    def _save(self, entry: _Entry) -> None:
        if self.tiers is None or self.tiers.holds(tuple(entry.tokens)):
            return
        state = snapshot(entry.cache)
        if state is not None:
            self.tiers.put(tuple(entry.tokens), state, [])


def _cache_offset(cache: list[Any]) -> int | None:
    """Tokens held by a KV-style cache, or None for caches that do not count them (SSM state)."""
    for layer in cache:
        offset = getattr(layer, "offset", None)
        if isinstance(offset, int):
            return offset
    return None
