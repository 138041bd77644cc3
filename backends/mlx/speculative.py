"""Speculative decoding for the MLX batch: prompt-lookup (`ngram`) drafts verified by the model.

A speculating sequence keeps its own KV cache next to the BatchGenerator groups. Each forward
feeds its pending token plus up to `k` drafted tokens; the model's greedy choice at each position
accepts the longest matching prefix of the draft and adds one token of its own, and the rejected
drafts are trimmed from the cache. Greedy output is therefore the plain decoder's, while one
forward yields up to 1 + k tokens. The tokens a forward accepts are handed out one per `step`,
so the batch keeps its one-token-per-step contract and a stop string found mid-chunk ends the
sequence exactly where plain decoding would.

Only greedy requests without logits processors or logprobs speculate (`eligible`); the others
decode plainly in the same batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from backends.base import GenerationRequest

MAX_NGRAM = 4  # the longest suffix looked up; longer matches predict better, shorter ones match more often


@dataclass(slots=True)
class SpecStats:
    """Drafted and accepted tokens since load, for the tier's stats."""

    drafted: int = 0
    accepted: int = 0


class NgramIndex:
    """Where each n-gram (n <= MAX_NGRAM) of a token sequence was last followed by a token.

    Updated as tokens are appended, so a lookup costs MAX_NGRAM dict probes, not a scan."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # `token` lands here and follows each n-gram ending just before
            for n in range(1, min(MAX_NGRAM, end) + 1):
                self._next[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def draft(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix seen before."""
        tokens = self.tokens
        for n in range(min(MAX_NGRAM, len(tokens) - 1), 0, -1):
            start = self._next.get(tuple(tokens[-n:]))
            if start is not None and start < len(tokens):
                return tokens[start : start + k]
        return []


def eligible(request: GenerationRequest, processors: Sequence[object], grammar: bool) -> bool:
    """Whether speculation reproduces the request's plain decoding exactly: greedy, nothing
    reshaping the logits (penalties, bias, grammar, a thinking budget), no logprobs to report."""
    return request.temperature == 0 and not processors and not grammar and not request.logprobs


@dataclass(slots=True)
class SpecDecoder:
    """One speculating sequence: its cache, its tokens and the accepted tokens not yet handed out."""

    model: Any
    prompt: list[int]
    cache: list[Any] | None  # from the prefix cache, holding prompt[:fed]; None: a fresh one
    fed: int  # tokens the cache holds (its prefix of `index.tokens`)
    max_draft: int
    eos: frozenset[int]
    max_tokens: int
    prefill_step: int
    stats: SpecStats
    index: NgramIndex = field(default_factory=NgramIndex)
    ready: deque[int] = field(default_factory=deque)  # accepted, not yet handed out
    k: int = 0  # the current draft length, adapted to how much of the drafts gets accepted
    produced: int = 0  # tokens accepted so far (handed out or ready)
    ended: bool = False  # an end-of-generation token or max_tokens was reached

    def __post_init__(self) -> None:
        if self.cache is None:
            self.cache = make_prompt_cache(self.model)
        self.index.extend(self.prompt)
        self.k = self.max_draft

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens the cache holds, for the prefix cache."""
        return self.index.tokens[: self.fed]

    def next(self) -> int | None:
        """The next token (an end-of-generation one included), or None when this step only prefilled."""
        if not self.ready:
            self._advance()
        return self.ready.popleft() if self.ready else None

    def _advance(self) -> None:
        assert self.cache is not None
        if self.fed < len(self.prompt):  # prefill one chunk per step, as the BatchGenerator does
            chunk = self.prompt[self.fed : self.fed + self.prefill_step]
            logits = self.model(mx.array([chunk]), cache=self.cache)
            self.fed += len(chunk)
            if self.fed == len(self.prompt):
                self._accept([_ints(mx.argmax(logits[0, -1:], axis=-1))[0]])
            else:
                mx.eval([c.state for c in self.cache])
            return
        # The last accepted token is not in the cache yet: it leads the forward.
        room = self.max_tokens - self.produced - 1  # a draft beyond max_tokens would be wasted
        draft = self.index.draft(min(self.k, room)) if room > 0 and can_trim_prompt_cache(self.cache) else []
        logits = self.model(mx.array([[self.index.tokens[-1], *draft]]), cache=self.cache)
        choices = _ints(mx.argmax(logits[0], axis=-1))
        accepted = 0
        while accepted < len(draft) and draft[accepted] == choices[accepted] and draft[accepted] not in self.eos:
            accepted += 1
        if len(draft) > accepted:
            trim_prompt_cache(self.cache, len(draft) - accepted)
        self.fed += 1 + accepted
        if draft:
            self.stats.drafted += len(draft)
            self.stats.accepted += accepted
            # Grow the draft while all of it is taken, shrink it when most is wasted.
            if accepted == len(draft):
                self.k = min(self.max_draft, self.k + 2)
            elif accepted < len(draft) // 2:
                self.k = max(1, self.k // 2)
        self._accept([*draft[:accepted], choices[accepted]])

    def _accept(self, tokens: list[int]) -> None:
        for token in tokens:
            self.index.extend([token])
            self.ready.append(token)
            self.produced += 1
            if token in self.eos or self.produced == self.max_tokens:
                self.ended = True
                return


def _ints(array: mx.array) -> list[int]:
    return [int(t) for t in cast("list[int]", array.tolist())]
