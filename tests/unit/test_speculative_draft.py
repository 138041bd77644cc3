"""Prompt-lookup drafts and the per-sequence draft length (backends.llamacpp.speculative)."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")

from backends.llamacpp.speculative import RETRY_AFTER, DraftLength, SpeculativeStats, ngram_draft


def test_ngram_draft_follows_the_latest_longest_match() -> None:
    assert ngram_draft([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]  # 3-gram (1, 2, 3)
    assert ngram_draft([7, 2, 3, 8, 9, 2, 3, 6, 2, 3], 2) == [6, 2]  # latest of two matches
    assert ngram_draft([4, 2, 3, 9, 1, 3], 2) == [9, 1]  # only the last token (3) recurs
    assert ngram_draft([5, 6, 7], 2) == []  # nothing recurs
    assert ngram_draft([1, 2, 1], 4) == [2, 1]  # the text runs out
    assert ngram_draft([1, 2, 1, 2], 0) == []


def test_draft_length_adapts_to_acceptance() -> None:
    length = DraftLength(4)
    assert length.next() == 4
    length.update(4, 1)  # rejected after one: draft what was accepted, plus one
    assert length.next() == 2
    length.update(2, 2)  # all accepted: one more
    assert length.next() == 3
    length.update(3, 0)
    length.update(1, 0)  # a single token rejected: stop drafting for a while
    assert [length.next() for _ in range(RETRY_AFTER)] == [0] * (RETRY_AFTER - 1) + [1]
    length.update(1, 1)
    assert length.next() == 2


def test_stats_view() -> None:
    stats = SpeculativeStats()
    stats.add(5, 3)
    stats.fallback()
    assert stats.view() == {"drafted": 5, "accepted": 3, "fallbacks": 1}
