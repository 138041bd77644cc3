"""`TokenBatch`: a `llama_batch` on numpy arrays we own (the decode batch and the draft model fill it)."""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp
import numpy as np


class TokenBatch:
    """A `llama_batch` on arrays we own, filled with numpy slices rather than per-token ctypes calls."""

    def __init__(self, capacity: int) -> None:
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        # seq_id is an array of pointers, one per token, each to that token's (single) sequence id.
        base = self.seq.ctypes.data
        pointers = (ctypes.POINTER(ctypes.c_int32) * capacity)(
            *(ctypes.cast(base + 4 * i, ctypes.POINTER(ctypes.c_int32)) for i in range(capacity))
        )
        self._pointers = pointers
        struct: Any = llama_cpp.llama_batch()  # (the stubs type its pointers as arrays)
        self.struct = struct
        struct.token = self.tokens.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token))
        struct.embd = None
        struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
        struct.n_seq_id = self.n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        struct.seq_id = ctypes.cast(pointers, ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id)))
        struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    @property
    def n_tokens(self) -> int:
        return int(self.struct.n_tokens)

    @n_tokens.setter
    def n_tokens(self, n: int) -> None:
        self.struct.n_tokens = n

    def permute(self, order: np.ndarray) -> None:
        """Reorder the first len(order) tokens: token i moves from index order[i]."""
        n = len(order)
        for array in (self.tokens, self.pos, self.seq, self.logits):
            array[:n] = array[:n][order]

    def set(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        self.tokens[i], self.pos[i], self.seq[i], self.logits[i] = token, pos, seq, logits

    def set_run(self, i: int, tokens: list[int], start: int, seq: int, last_logits: bool, every: bool = False) -> None:
        n = len(tokens)
        self.tokens[i : i + n] = tokens
        self.pos[i : i + n] = np.arange(start, start + n, dtype=np.int32)
        self.seq[i : i + n] = seq
        self.logits[i : i + n] = every  # every position's logits: scoring the prompt
        self.logits[i + n - 1] = last_logits or every
