"""KV slots for the llama.cpp engine: the context's sequence ids and the prompt state they keep.

Each of the `MAX_BATCH` sequence ids (KV slots) has its own KV stream (`kv_layout`). A slot keeps
its KV after its request ends: the next request whose prompt starts with the same tokens (the
previous turn of a conversation) reuses it, like llama-server's slots. A prefix held by another
slot is copied in (`share`). A slot's KV belongs to the LoRA adapter it was computed with and is
reused only by requests with that adapter.

Some memory cannot be cut back to any position: a sliding-window layer (Gemma 3, without
`SWA_FULL`) keeps only its last window, a recurrent layer (Mamba, LFM2, Granite-4-H) only its
last state. For those a slot keeps context checkpoints, as llama-server does: that part of its
state saved a few tokens before the end of each prompt, restored when a later prompt shares
the prefix up to there.

With a `PromptCache`, a slot's state is saved there before another conversation takes the slot
(and at close), and a prompt that shares more with a cached state than with any slot has it
restored into the slot it takes (`backends.prompt_cache`).

A token's index in `KvSlot.tokens` is its position in the KV but after an image on an M-RoPE model
(`vision`), which takes fewer positions than places: the slot keeps where such shifts start
(`KvSlot.shifts`), and whatever names KV cells to llama.cpp (cutting, fillers) names positions.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from backends.base import common_prefix
from backends.llamacpp.vision import image_start
from backends.prompt_cache import PromptCache

# A checkpoint is taken this many tokens before a prompt's end, so that the same prompt again
# (or one whose template ends differently, e.g. a thinking switch) still finds one before it.
CHECKPOINT_TAIL = 4
CHECKPOINTS_PER_SLOT = 2  # each holds one sequence's window or recurrent state in host memory
_PARTIAL = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
# A slot taken by another request is saved to the prompt cache when it would lose this many
# tokens or more: a few lost at the end are a turn's template re-rendered, not a conversation.
SAVE_MIN_TOKENS = 64
_SHIFTS = -1  # in a cached prompt's meta: the checkpoints' lengths, then this, then the shifts' pairs


@dataclass(slots=True, eq=False)
class Checkpoint:
    """The part of a sequence's state that cannot be cut back, after its first `n_tokens` tokens."""

    n_tokens: int
    data: Any  # a ctypes byte array from llama_state_seq_get_data_ext


@dataclass(slots=True)
class KvSlot:
    """A KV sequence id and the tokens its cells hold, at positions 0.. (`position`)."""

    seq: int
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    used: int = 0  # LRU clock
    adapter: str | None = None  # the LoRA adapter the KV was computed with
    checkpoints: list[Checkpoint] = field(default_factory=list)  # oldest first
    # (index, shift): from tokens[index] on, positions are index - shift (after M-RoPE images)
    shifts: list[tuple[int, int]] = field(default_factory=list)

    def position(self, index: int) -> int:
        """The position of `tokens[index]` (or of the token appended there); inside an image, that
        of its first place plus the index within it (only its start is ever cut at)."""
        shift = 0
        for at, s in self.shifts:
            if at > index:
                break
            shift = s
        return index - shift

    def shift_after_image(self, index: int, position: int) -> None:
        """The image just evaluated ends before `tokens[index]`, which goes at `position`."""
        if position != self.position(index):
            self.shifts.append((index, index - position))


class KvSlots:
    """The context's sequence ids and the prompt state they keep between requests.

    `swa`: the model's sliding window when its SWA layers keep only the window (0: none or
    `swa_full`); `recurrent`: it has recurrent layers. Either way prompts are checkpointed."""

    def __init__(
        self, context: Any, count: int, swa: int = 0, recurrent: bool = False, cache: PromptCache | None = None
    ) -> None:
        self._ctx = context
        self.cache = cache if cache is not None and cache.enabled else None
        self._memory = llama_cpp.llama_get_memory(context)
        self._swa = swa
        self.checkpointing = swa > 0 or recurrent
        self.fillable = not recurrent  # a filler token's KV can be taken out again; a recurrent update cannot
        self._stream = llama_cpp.llama_n_ctx_seq(context)  # cells per stream
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
        cached, n_cached = None, 0
        if self.cache is not None and adapter is None:
            cached, n_cached = self.cache.longest(prompt, len(prompt) - 1)
            if n_cached <= usable[source.seq]:
                cached = None
            if cached is None:
                self.cache.miss()  # a live slot's prefix, if any, serves it
        if cached is not None:  # the cache holds more than any slot: the slot that loses least takes it
            slot = min(free, key=lambda s: (len(s.tokens) - usable[s.seq], s.used))
        self.save(slot, 0 if cached is not None or usable[source.seq] > usable[slot.seq] else usable[slot.seq])
        slot.busy, slot.used = True, next(self._clock)
        slot.adapter = adapter
        if cached is not None and self._load(slot, cached):
            return slot, self._keep(slot, n_cached)
        if usable[source.seq] > usable[slot.seq] and self.share(source, slot, usable[source.seq]):
            return slot, len(slot.tokens)
        return slot, self._keep(slot, usable[slot.seq])

    def save(self, slot: KvSlot, keep: int) -> None:
        """Put `slot`'s state in the prompt cache if it is about to lose all but `keep` tokens."""
        cache = self.cache
        tokens = tuple(slot.tokens)
        if cache is None or slot.adapter is not None or len(tokens) - keep < SAVE_MIN_TOKENS or cache.holds(tokens):
            return
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq)
        data = (ctypes.c_uint8 * size)()
        if not size or llama_cpp.llama_state_seq_get_data(self._ctx, data, size, slot.seq) != size:
            return
        blobs = [bytes(data), *(bytes(c.data) for c in slot.checkpoints)]
        meta = [c.n_tokens for c in slot.checkpoints]
        if slot.shifts:  # (entries without them, as older ones, have none)
            meta += [_SHIFTS, *(n for shift in slot.shifts for n in shift)]
        cache.put(tokens, blobs, meta)

    def save_all(self) -> None:
        """Save every idle slot's state (before the context is freed)."""
        for slot in self.slots:
            if not slot.busy:
                self.save(slot, 0)

    def _load(self, slot: KvSlot, cached: Any) -> bool:
        """Restore a cached state into `slot` (emptied first); False if it could not be."""
        assert self.cache is not None
        self.wipe(slot)
        blobs = self.cache.take(cached)
        if not blobs:
            return False
        state = (ctypes.c_uint8 * len(blobs[0])).from_buffer_copy(blobs[0])
        if not llama_cpp.llama_state_seq_set_data(self._ctx, state, len(blobs[0]), slot.seq):
            self.wipe(slot)
            return False
        slot.tokens = list(cached.tokens)
        meta, shifts = list(cached.meta), []
        if _SHIFTS in meta:
            at = meta.index(_SHIFTS)
            meta, shifts = meta[:at], meta[at + 1 :]
        slot.shifts = list(zip(shifts[::2], shifts[1::2], strict=True))
        slot.checkpoints = [
            Checkpoint(n, (ctypes.c_uint8 * len(b)).from_buffer_copy(b)) for n, b in zip(meta, blobs[1:], strict=True)
        ]
        return True

    def share(self, source: KvSlot, slot: KvSlot, n: int) -> bool:
        """Put `source`'s first `n` tokens of KV into `slot` (emptied first); False if none came.

        Streams are separate buffers: llama.cpp copies a sequence into another stream only whole
        (`llama_memory_seq_cp` with p0 = p1 = -1: every cell of the stream, on the device, at the
        next `llama_decode`), and the tail is then cut. Where the tail cannot be cut
        (`checkpointing`), the sequence's used cells travel through host memory at once instead,
        so that a checkpoint restored over them is not overwritten by that pending copy."""
        self.wipe(slot)
        if self.checkpointing:
            size = llama_cpp.llama_state_seq_get_size(self._ctx, source.seq)
            data = (ctypes.c_uint8 * size)()
            written = llama_cpp.llama_state_seq_get_data(self._ctx, data, size, source.seq)
            if not written or not llama_cpp.llama_state_seq_set_data(self._ctx, data, written, slot.seq):
                self.wipe(slot)
                return False
        else:
            llama_cpp.llama_memory_seq_cp(self._memory, source.seq, slot.seq, -1, -1)
        slot.tokens, slot.shifts = list(source.tokens), list(source.shifts)
        slot.checkpoints = list(source.checkpoints)  # read-only state: shared, never changed in place
        return self._keep(slot, n) > 0

    def _keep(self, slot: KvSlot, n: int) -> int:
        """Cut `slot` back to its first `n` tokens (fewer when its memory cannot); returns how many stay."""
        mem = self._memory
        n = image_start(slot.tokens, n)  # an image's KV stays whole or goes
        if n and self._cut(slot, n):
            return n
        # The live state cannot serve position n: go back to the latest checkpoint at or before it.
        for checkpoint in reversed(slot.checkpoints):
            if (
                0 < checkpoint.n_tokens <= n
                and self._restore(slot, checkpoint)
                and self._cut(slot, checkpoint.n_tokens)
            ):
                return checkpoint.n_tokens
        llama_cpp.llama_memory_seq_rm(mem, slot.seq, -1, -1)
        slot.tokens, slot.checkpoints, slot.shifts = [], [], []
        return 0

    def _cut(self, slot: KvSlot, n: int) -> bool:
        """Drop tokens n.. of `slot`: whether what stays can continue at token n."""
        mem = self._memory
        if n > len(slot.tokens):
            return False
        pos = slot.position(n)
        # A sliding window must still hold every position that position `pos` attends to: those
        # after pos - window (llama.cpp masks p0 where pos - p0 >= window; a chunked window needs fewer).
        pos_min = llama_cpp.llama_memory_seq_pos_min(mem, slot.seq)
        if self._swa and pos_min > max(0, pos - self._swa + 1):
            return False
        if not llama_cpp.llama_memory_seq_rm(mem, slot.seq, pos, -1):
            return False  # a recurrent state cannot be cut back (it is left as it was)
        del slot.tokens[n:]
        slot.checkpoints = [c for c in slot.checkpoints if c.n_tokens <= n]
        slot.shifts = [s for s in slot.shifts if s[0] <= n]
        return True

    def _restore(self, slot: KvSlot, checkpoint: Checkpoint) -> bool:
        data = checkpoint.data
        return bool(llama_cpp.llama_state_seq_set_data_ext(self._ctx, data, len(data), slot.seq, _PARTIAL))

    def checkpoint_at(self, prompt_len: int) -> int | None:
        """Where a prompt of this length is checkpointed (the batch ends a step there), or None."""
        at = prompt_len - CHECKPOINT_TAIL
        return at if self.checkpointing and at > 0 else None

    def checkpoint(self, slot: KvSlot) -> None:
        """Save the uncuttable part of `slot`'s state as it is now, after `slot.tokens`."""
        size = llama_cpp.llama_state_seq_get_size_ext(self._ctx, slot.seq, _PARTIAL)
        data = (ctypes.c_uint8 * size)()
        if size and llama_cpp.llama_state_seq_get_data_ext(self._ctx, data, size, slot.seq, _PARTIAL) == size:
            kept = [c for c in slot.checkpoints if c.n_tokens < len(slot.tokens)]
            slot.checkpoints = [*kept[-(CHECKPOINTS_PER_SLOT - 1) :], Checkpoint(len(slot.tokens), data)]

    def fillers(self, present: set[int], room: int, longest: int) -> list[tuple[int, int, int]]:
        """(seq, position, token) of a throwaway token for each stream between the lowest and the
        highest of `present` that a step does not decode, or none when they do not all fit: with
        them llama.cpp evaluates the step as one graph (see `LlamaCppBatch._order`). Each goes
        after what its slot holds and is removed again by `unfill`; a sliding window loses to it
        only cells that the slot's next position would not attend to. None either when a gap
        holds more than `longest` tokens (the step's longest sequence): every stream in a graph
        attends over as many cells as its longest one, so that would cost more than it saves."""
        if not self.fillable or len(present) < 2:
            return []
        gaps = [s for s in self.slots[min(present) : max(present) + 1] if s.seq not in present]
        if len(gaps) > room or any(len(s.tokens) >= min(self._stream, longest) for s in gaps):
            return []
        # (a filler goes at the slot's next position; an image place is no token)
        return [(s.seq, s.position(len(s.tokens)), max(s.tokens[-1], 0) if s.tokens else 0) for s in gaps]

    def unfill(self, fillers: list[tuple[int, int, int]]) -> None:
        for seq, pos, _ in fillers:
            llama_cpp.llama_memory_seq_rm(self._memory, seq, pos, -1)

    def wipe(self, slot: KvSlot) -> None:
        """Empty an acquired slot's KV, to evaluate a prompt from its first token."""
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
        slot.tokens, slot.checkpoints, slot.shifts = [], [], []

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
            slot.tokens, slot.checkpoints, slot.shifts = [], [], []
        if self.cache is not None:
            self.cache.clear()
