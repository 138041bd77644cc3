"""Speculative decoding for the MLX batch: drafts by prompt lookup (`ngram`) or by a small draft
model (`draft`, `ModelDrafter`), verified by the model.

A speculating sequence keeps its own KV cache next to the BatchGenerator groups (and, in `draft`
mode, one of the draft model's). Each forward feeds its pending token plus up to `k` drafted
tokens; the sequence's own sampler picks a token at each position in turn, a draft token is kept
while the pick equals it, and the first pick that differs is the step's own token; the rejected
drafts are trimmed from both caches. Both kinds of draft are deterministic given the tokens so far
(a one-hot proposal q), so this is the standard speculative-sampling rule made exact: a draft token
x is kept with probability min(1, p(x)/q(x)) = p(x), the chance the sampler picks it, and a
rejection's pick is a sample of p without x, the normalised residual max(0, p - q). Greedy output
is the plain decoder's; sampled output has its distribution (and, the sampler being called once per
token, a seeded request draws the same numbers as when decoded plainly). One forward yields up to
1 + k tokens; they are handed out one per `step`, so the batch keeps its one-token-per-step
contract and a stop string found mid-chunk ends the sequence exactly where plain decoding would.

Requests without logits processors (penalties, bias, a grammar, a thinking budget: they keep
per-step state) or logprobs speculate (`eligible`); the others decode plainly in the same batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from backends.base import GenerationRequest
from backends.mlx.sampling import Sampler

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
    """Whether speculation keeps the request's plain decoding exact: nothing reshaping the logits
    step by step (penalties, bias, grammar, a thinking budget), no logprobs to report."""
    return not processors and not grammar and not request.logprobs


@dataclass(slots=True)
class ModelDrafter:
    """A draft model's greedy proposals for one sequence, from its own KV cache.

    The cache holds a prefix (`fed` tokens) of the sequence's tokens; a draft first feeds what it
    lacks, then proposes k tokens one forward each, all in one lazy graph evaluated once."""

    model: Any
    prefill_step: int
    cache: list[Any] = field(init=False)
    fed: int = 0

    def __post_init__(self) -> None:
        self.cache = make_prompt_cache(self.model)

    def catch_up(self, tokens: Sequence[int]) -> mx.array | None:
        """Feed `tokens[fed:]` in prefill-sized chunks; the last position's logits (None: nothing fed)."""
        logits = None
        while self.fed < len(tokens):
            chunk = tokens[self.fed : self.fed + self.prefill_step]
            logits = self.model(mx.array([chunk]), cache=self.cache)[0, -1]
            self.fed += len(chunk)
            if self.fed < len(tokens):
                mx.eval([c.state for c in self.cache])
        return logits

    def draft(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to `k` greedy tokens after `tokens` (whose last one the target has not seen yet)."""
        if k <= 0 or not can_trim_prompt_cache(self.cache):
            return []
        logits = self.catch_up(tokens)
        assert logits is not None
        proposed = [mx.argmax(logits, axis=-1)]
        for _ in range(k - 1):
            logits = self.model(proposed[-1].reshape(1, 1), cache=self.cache)[0, -1]
            proposed.append(mx.argmax(logits, axis=-1))
        self.fed += k - 1  # the last proposal is not fed
        return _ints(mx.stack(proposed))

    def keep(self, tokens: int) -> None:
        """Drop what the cache holds beyond the sequence's first `tokens` tokens (rejected drafts)."""
        if self.fed > tokens:
            trim_prompt_cache(self.cache, self.fed - tokens)
            self.fed = tokens


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
    sample: Sampler | None = None  # the request's sampler; None: greedy (argmax)
    drafter: ModelDrafter | None = None  # `draft` mode; None: prompt lookup
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
            if self.drafter is not None:  # the draft model reads the prompt alongside
                self.drafter.catch_up(self.prompt[: self.fed])
            if self.fed == len(self.prompt):
                self._accept(self._choose(logits[0, -1:], []))
            else:
                mx.eval([c.state for c in self.cache])
            return
        # The last accepted token is not in the cache yet: it leads the forward.
        tokens = self.index.tokens
        room = self.max_tokens - self.produced - 1  # a draft beyond max_tokens would be wasted
        k = min(self.k, room) if can_trim_prompt_cache(self.cache) else 0
        draft = self.index.draft(k) if self.drafter is None else self.drafter.draft(tokens, k)
        logits = self.model(mx.array([[tokens[-1], *draft]]), cache=self.cache)
        choices = self._choose(logits[0], draft)
        accepted = len(choices) - 1
        if len(draft) > accepted:
            trim_prompt_cache(self.cache, len(draft) - accepted)
        if self.drafter is not None:
            self.drafter.keep(len(tokens) + accepted)
        self.fed += 1 + accepted
        if draft:
            self.stats.drafted += len(draft)
            self.stats.accepted += accepted
            # Grow the draft while all of it is taken, shrink it when most is wasted.
            if accepted == len(draft):
                self.k = min(self.max_draft, self.k + 2)
            elif accepted < len(draft) // 2:
                self.k = max(1, self.k // 2)
        self._accept(choices)

    def _choose(self, logits: mx.array, draft: list[int]) -> list[int]:
        """The draft tokens kept and the token after them, from the logits at each of the
        1 + len(draft) positions (see the module's docstring for why this is exact)."""
        if self.sample is None:  # greedy: every position's choice at once
            choices = _ints(mx.argmax(logits, axis=-1))
        else:
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            choices = []
            # One sampler call per token handed out, as plain decoding makes: a seeded sampler's
            # step counter stays in step, and no position past the first rejection is drawn.
            for i in range(len(draft) + 1):
                choices.append(_ints(self.sample(logprobs[i : i + 1]).reshape(-1))[0])
                if i == len(draft) or choices[i] != draft[i] or draft[i] in self.eos:
                    break
        kept = 0
        while kept < len(draft) and draft[kept] == choices[kept] and draft[kept] not in self.eos:
            kept += 1
        return [*draft[:kept], choices[kept]]

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


VOCAB_SAMPLE = 1024  # token ids compared across the vocabulary, besides every special token


def vocabulary_mismatch(tokenizer: Any, draft: Any) -> str | None:
    """How the draft model's tokenizer differs from the model's (None: they agree), read from the
    vocabulary size, the special tokens and the strings of ids spread across the vocabulary: a
    draft with other token ids would propose tokens the model reads as something else."""
    size, draft_size = len(tokenizer.get_vocab()), len(draft.get_vocab())
    if size != draft_size:
        return f"{draft_size} tokens, the model has {size}"
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        ours, theirs = getattr(tokenizer, name, None), getattr(draft, name, None)
        if ours != theirs:
            return f"{name} {theirs!r}, the model's is {ours!r}"
    if set(tokenizer.eos_token_ids) != set(draft.eos_token_ids):
        return f"end-of-generation ids {sorted(draft.eos_token_ids)}, the model's are {sorted(tokenizer.eos_token_ids)}"
    ids = sorted({*tokenizer.all_special_ids, *draft.all_special_ids, *range(0, size, max(1, size // VOCAB_SAMPLE))})
    ours, theirs = tokenizer.convert_ids_to_tokens(ids), draft.convert_ids_to_tokens(ids)
    for token, a, b in zip(ids, ours, theirs, strict=True):
        if a != b:
            return f"token {token} is {b!r}, the model's is {a!r}"
    return None
