"""KV slots for the llama.cpp engine: the context's sequence ids and the prompt state they keep.

The context has one unified KV cache of `MAX_BATCH x N_CTX` cells shared by `MAX_BATCH` sequence
ids (KV slots), so every admitted sequence can always grow to its full context window. A slot keeps
its KV after its request ends: the next request whose prompt starts with the same tokens (the
previous turn of a conversation) reuses it, like llama-server's slots. Copying a prefix from a
busy slot is cheap in a unified cache (the cells are shared, not copied). A slot's KV belongs to
the LoRA adapter it was computed with and is reused only by requests with that adapter.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from backends.base import common_prefix


@dataclass(slots=True)
class KvSlot:
    """A KV sequence id and the tokens its cells hold, positions 0..len-1."""

    seq: int
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    used: int = 0  # LRU clock
    adapter: str | None = None  # the LoRA adapter the KV was computed with


class KvSlots:
    """The context's sequence ids and the prompt state they keep between requests."""

    def __init__(self, memory: Any, count: int) -> None:
        self._memory = memory
        self.slots = [KvSlot(i) for i in range(count)]
        self._clock = itertools.count(1)

    def acquire(self, prompt: list[int], adapter: str | None = None) -> tuple[KvSlot, int]:
        """A free slot holding as much of `prompt` as any slot can give; returns (slot, reused).
        Only KV computed with the same adapter is reused: an adapter changes every K and V."""
        free = [s for s in self.slots if not s.busy]
        assert free, "more sequences than slots"
        # Requests with an adapter reuse no KV for now: reusing one, while another adapter group
        # decoded between its steps, gave wrong tokens in tests (cause not yet found in llama.cpp).
        usable = {
            s.seq: min(common_prefix(s.tokens, prompt), len(prompt) - 1) if s.adapter == adapter is None else 0
            for s in self.slots
        }
        # The next turn of a conversation, or the same prompt again, goes back to its slot: the
        # slot holds the whole prompt, or the prompt keeps at least half of what the slot holds.
        # Anything else writes into the free slot that loses least (then the least recently
        # used): a side request sharing only the template's header with an agent's 20k-token
        # conversation takes another slot, sharing that prefix from whichever slot holds it.
        slot = max(free, key=lambda s: (usable[s.seq], -s.used))
        n = usable[slot.seq]
        if n == 0 or (n < len(prompt) - 1 and len(slot.tokens) - n > n):
            slot = min(free, key=lambda s: (len(s.tokens) - usable[s.seq], s.used))
        source = max(self.slots, key=lambda s: usable[s.seq])
        slot.busy, slot.used = True, next(self._clock)
        mem = self._memory
        if usable[source.seq] > usable[slot.seq]:
            # Another sequence holds a longer prefix: share its cells.
            n = self.copy_prefix(source, slot, usable[source.seq])
        else:
            n = usable[slot.seq]
            if not llama_cpp.llama_memory_seq_rm(mem, slot.seq, n, -1):
                n = 0  # this memory cannot cut a sequence short (recurrent state): start over
                llama_cpp.llama_memory_seq_rm(mem, slot.seq, -1, -1)
            del slot.tokens[n:]
        if n and llama_cpp.llama_memory_seq_pos_min(mem, slot.seq) > 0:
            # A sliding-window cache dropped early positions: the prefix cannot be rebuilt from it.
            llama_cpp.llama_memory_seq_rm(mem, slot.seq, -1, -1)
            slot.tokens, n = [], 0
        slot.adapter = adapter
        return slot, n

    def copy_prefix(self, source: KvSlot, slot: KvSlot, n: int) -> int:
        """Make `slot` hold the first `n` tokens `source` holds, and return how many it holds: the
        cells are shared, not copied, in this unified cache; none where a sliding-window cache has
        dropped the source's early positions."""
        mem = self._memory
        llama_cpp.llama_memory_seq_rm(mem, slot.seq, -1, -1)
        llama_cpp.llama_memory_seq_cp(mem, source.seq, slot.seq, 0, n)
        slot.tokens = source.tokens[:n]
        if n and llama_cpp.llama_memory_seq_pos_min(mem, slot.seq) > 0:
            self.wipe(slot)
            return 0
        return n

    def wipe(self, slot: KvSlot) -> None:
        """Empty an acquired slot's KV, to evaluate a prompt from its first token."""
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
        slot.tokens = []

    def release(self, slot: KvSlot) -> None:
        slot.busy, slot.used = False, next(self._clock)

    def drop(self, slot: KvSlot) -> None:
        """Forget what a slot holds (its KV state is unknown after a failed decode)."""
        self.wipe(slot)
        self.release(slot)

    def forget_adapter(self, adapter: str) -> None:
        """Drop the KV an unloaded adapter computed (a new file may come back under its name)."""
        for slot in self.slots:
            if slot.adapter == adapter and not slot.busy:
                self.wipe(slot)
                slot.adapter = None

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)
        for slot in self.slots:
            slot.tokens = []
