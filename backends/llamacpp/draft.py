"""The draft model of `SPECULATIVE=draft` on llama.cpp: a second, smaller model sharing the
target's vocabulary proposes each speculating sequence's next tokens, greedily.

Its context has one sequence id per KV slot, the same ids as the target's, and remembers which
tokens each id's KV holds. Before drafting, a sequence's draft KV is cut back to what it shares
with the sequence's text (the tokens the target accepted) and catches up on the rest; that also
rebuilds it whenever the target's KV came from elsewhere (slot reuse, a shared prefix, the
prompt cache). All drafting sequences catch up in one `llama_decode` and then take one
`llama_decode` per draft position, together.

The draft is the argmax at each position: a one-hot draft distribution q. The batch keeps a
draft token while the target's own sampler draws that very token there, i.e. with probability
p(x) = min(1, p(x)/q(x)), and on a rejection the token drawn is a sample of p without x,
renormalised, the residual max(0, p - q): the standard speculative sampling rule, so sampled
output keeps plain decoding's distribution and greedy output is plain decoding's tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np

from backends.base import common_prefix
from backends.llamacpp.native_batch import TokenBatch
from backends.llamacpp.sampling import logits_row

VOCAB_SAMPLE = 1024  # token texts compared across the vocabulary, besides the special tokens

log = logging.getLogger(__name__)


def vocab_mismatch(target: Any, draft: Any) -> str | None:
    """Why a draft model's vocabulary cannot serve the target's (None: it can): the same number of
    tokens, the same special tokens, and the same texts for a sample spread over the vocabulary."""
    n_target, n_draft = llama_cpp.llama_vocab_n_tokens(target), llama_cpp.llama_vocab_n_tokens(draft)
    if n_target != n_draft:
        return f"{n_target} tokens in the model's vocabulary, {n_draft} in the draft's"
    specials = (
        llama_cpp.llama_vocab_bos,
        llama_cpp.llama_vocab_eos,
        llama_cpp.llama_vocab_eot,
        llama_cpp.llama_vocab_sep,
        llama_cpp.llama_vocab_nl,
        llama_cpp.llama_vocab_pad,
    )
    for special in specials:
        if special(target) != special(draft):
            name = special.__name__.removeprefix("llama_vocab_")
            return f"{name} is token {special(target)} in the model, {special(draft)} in the draft"
    ids = {special(target) for special in specials} | set(range(0, n_target, max(1, n_target // VOCAB_SAMPLE)))
    for token in sorted(t for t in ids if 0 <= t < n_target):
        if _text(target, token) != _text(draft, token):
            return f"token {token} is {_text(target, token)!r} in the model, {_text(draft, token)!r} in the draft"
    return None


def _text(vocab: Any, token: int) -> bytes:
    return bytes(llama_cpp.llama_vocab_get_text(vocab, token) or b"")


class DraftModel:
    """Greedy drafts for the target's sequences (see the module docstring). `swa`: the draft's
    sliding window when its SWA layers keep only the window (0: none)."""

    def __init__(self, model: Any, context: Any, n_batch: int, slots: int, swa: int = 0) -> None:
        self.model, self.context = model, context
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._memory = llama_cpp.llama_get_memory(context)
        self._capacity = n_batch
        self._batch = TokenBatch(n_batch)
        self._swa = swa
        self._held: list[list[int]] = [[] for _ in range(slots)]  # the tokens each sequence id's KV holds

    def propose(self, wants: Sequence[tuple[int, list[int], int]]) -> list[list[int]]:
        """For each (sequence id, its text so far, k): up to k tokens the draft model expects next
        (fewer after an end-of-generation token). Nothing, for all, if a draft decode fails."""
        drafts: list[list[int]] = [[] for _ in wants]
        try:
            self._catch_up(wants, drafts)
            self._extend(wants, drafts)
        except _DecodeFailed as failure:
            log.warning("The draft model's decode failed (status %d): no drafts this step", failure.status)
            llama_cpp.llama_memory_clear(self._memory, True)
            self._held = [[] for _ in self._held]
            return [[] for _ in wants]
        return drafts

    def _catch_up(self, wants: Sequence[tuple[int, list[int], int]], drafts: list[list[int]]) -> None:
        """Cut each sequence's draft KV back to what it shares with its text and feed the rest, all
        sequences in as few decodes as the batch allows; each one's last logits give its first draft."""
        todo: list[tuple[int, int, list[int]]] = []  # (index in wants, next position, tokens to feed)
        for i, (seq, text, _) in enumerate(wants):
            held = self._held[seq]
            n = self._cut(seq, min(common_prefix(held, text), len(text) - 1))  # the last token is fed for its logits
            todo.append((i, n, text[n:]))
        batch = self._batch
        while todo:
            n, ends, rest = 0, [], []
            for i, pos, tokens in todo:
                take = min(self._capacity - n, len(tokens))
                if take == 0:
                    rest.append((i, pos, tokens))
                    continue
                last = take == len(tokens)
                batch.set_run(n, tokens[:take], pos, wants[i][0], last)
                self._held[wants[i][0]].extend(tokens[:take])
                n += take
                if last:
                    ends.append((i, n - 1))
                else:
                    rest.append((i, pos + take, tokens[take:]))
            self._decode(n)
            for i, index in ends:
                drafts[i].append(self._argmax(index))
            todo = rest

    def _extend(self, wants: Sequence[tuple[int, list[int], int]], drafts: list[list[int]]) -> None:
        """Feed each sequence's latest draft token and take the next, one decode per position."""
        batch = self._batch
        while True:
            going = [
                i
                for i, (_, _, k) in enumerate(wants)
                if 0 < len(drafts[i]) < k and not llama_cpp.llama_vocab_is_eog(self._vocab, drafts[i][-1])
            ]
            if not going:
                return
            for n, i in enumerate(going):
                seq = wants[i][0]
                batch.set(n, drafts[i][-1], len(self._held[seq]), seq, True)
                self._held[seq].append(drafts[i][-1])
            self._decode(len(going))
            for n, i in enumerate(going):
                drafts[i].append(self._argmax(n))

    def _cut(self, seq: int, n: int) -> int:
        """Drop positions n.. of `seq`'s draft KV (all of it where what stays could not continue at
        n: a sliding window that lost what position n attends to); returns how many tokens stay."""
        held = self._held[seq]
        if n >= len(held):
            return len(held)
        pos_min = llama_cpp.llama_memory_seq_pos_min(self._memory, seq)
        if n == 0 or (self._swa and pos_min > max(0, n - self._swa + 1)):
            n = 0
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq, n, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
            n = 0
        del held[n:]
        return n

    def _decode(self, n: int) -> None:
        self._batch.n_tokens = n
        status = llama_cpp.llama_decode(self.context, self._batch.struct)
        if status != 0:
            raise _DecodeFailed(status)

    def _argmax(self, index: int) -> int:
        return int(np.argmax(logits_row(self.context, index, self._n_vocab)))

    def close(self) -> None:
        llama_cpp.llama_free(self.context)
        llama_cpp.llama_model_free(self.model)


class _DecodeFailed(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status
