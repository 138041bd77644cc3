"""Speculative decoding for the llama.cpp batch: drafts by prompt lookup (`ngram`).

A speculating sequence puts its next token and up to `k` drafted tokens into the step's one
`llama_decode`, logits on all. The batch then samples position by position with the sequence's
own sampler (penalties, grammar, top-k/p, min-p as in plain decoding) and keeps a draft token only
while it equals what was sampled there: the first mismatch ends the run and the KV of the rejected
tokens is removed. A prompt-lookup draft is deterministic (q is one-hot), so "sample t from p, keep
the draft iff t equals it" is exactly the acceptance rule (accept with p(t), else sample from p
without t, renormalised): the output has the distribution of plain decoding, and greedy output is
the same tokens.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

NGRAM_MAX = 3  # longest tail looked up in the text so far; shorter ones are tried after it
NGRAM_MIN = 1
RETRY_AFTER = 16  # steps a sequence whose drafts are never accepted drafts nothing, then tries 1 token


@dataclass(slots=True)
class SpeculativeStats:
    """A tier's counters: read by the stats view while the decode thread adds to them."""

    drafted: int = 0  # draft tokens put into a decode step
    accepted: int = 0  # of those, kept
    fallbacks: int = 0  # sequences decoded plainly although the tier speculates
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, drafted: int, accepted: int) -> None:
        with self._lock:
            self.drafted += drafted
            self.accepted += accepted

    def fallback(self) -> None:
        with self._lock:
            self.fallbacks += 1

    def view(self) -> dict[str, int]:
        with self._lock:
            return {"drafted": self.drafted, "accepted": self.accepted, "fallbacks": self.fallbacks}


@dataclass(slots=True)
class DraftLength:
    """How many tokens a sequence drafts next: grows by one after a fully accepted draft, drops to
    what was accepted (plus one) after a rejection, and to 0 (nothing drafted for `RETRY_AFTER`
    steps) after drafts of which nothing is accepted."""

    most: int
    now: int = 0
    idle: int = 0

    def __post_init__(self) -> None:
        self.now = self.most

    def next(self) -> int:
        if self.now == 0:
            self.idle += 1
            if self.idle < RETRY_AFTER:
                return 0
            self.now, self.idle = 1, 0
        return self.now

    def update(self, drafted: int, accepted: int) -> None:
        if accepted == drafted:
            self.now = min(self.most, self.now + 1)
        elif accepted == 0 and self.now == 1:
            self.now = 0
        else:
            self.now = max(1, min(self.now, accepted + 1))


def ngram_draft(tokens: list[int], k: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the text's last n tokens
    (n = `NGRAM_MAX` down to `NGRAM_MIN`), or none."""
    size = len(tokens)
    if k <= 0 or size <= NGRAM_MIN:
        return []
    text = np.asarray(tokens, dtype=np.int32)
    for n in range(min(NGRAM_MAX, size - 1), NGRAM_MIN - 1, -1):
        # Starts of earlier windows equal to the last n tokens (the tail itself excluded).
        span = size - n
        match = text[:span] == text[span]
        for j in range(1, n):
            match &= text[j : span + j] == text[span + j]
        hits = np.flatnonzero(match)
        if len(hits):
            start = int(hits[-1]) + n
            return [int(t) for t in text[start : start + k]]
    return []
