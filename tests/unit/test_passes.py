"""Forward passes of the torch/onnx engines: longest first, bounded by rows and padded tokens."""

from __future__ import annotations

import random

from embedders.base import passes


def test_passes_cover_every_input_once_longest_first_within_both_bounds() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(200)] + [500]
    chunks = list(passes(lengths, batch_size=16, max_tokens=128))
    order = [i for chunk in chunks for i in chunk]
    assert sorted(order) == list(range(len(lengths)))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert chunks[0] == [200]  # longer than the budget: alone
    for chunk in chunks:
        assert len(chunk) <= 16
        assert len(chunk) == 1 or len(chunk) * max(lengths[i] for i in chunk) <= 128
    assert len(chunks) < len(lengths)  # short inputs still share passes


def test_without_a_token_budget_passes_are_batch_size_rows() -> None:
    assert [len(c) for c in passes([3] * 10, batch_size=4)] == [4, 4, 2]
    assert list(passes([], batch_size=4, max_tokens=64)) == []
