"""Speculative decoding (`SPECULATIVE=ngram`) in the MLX batch, on the tiny random mlx-lm model.

Speculation must not change a greedy answer: every test compares a speculating batch with the
same requests decoded plainly (`speculative=off`), token for token, with batching on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlx_lm")

from backends.base import GenerationRequest, Token
from backends.mlx.backend import MlxBackend
from backends.mlx.speculative import NgramIndex
from kernel.config import TierSettings
from kernel.errors import ModelUnavailableError
from tests.batching import batched

MAX = 48
# An edit task in miniature: the answer is meant to copy the text, so prompt lookup has drafts.
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door. " * 3
EDIT = f"Repeat this text, changing fox to wolf:\n{TEXT}\n"


def _backend(path: Path, **tier: Any) -> MlxBackend:
    backend = MlxBackend(TierSettings(name="light", n_ctx=2048, max_batch=4, n_batch=64, **tier), str(path))
    backend.load()
    return backend


@pytest.fixture(scope="module")
def plain(tiny_mlx_model: Path) -> Iterator[MlxBackend]:
    backend = _backend(tiny_mlx_model)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def ngram(tiny_mlx_model: Path) -> Iterator[MlxBackend]:
    backend = _backend(tiny_mlx_model, speculative="ngram", draft_tokens=6)
    yield backend
    backend.close()


def _greedy(prompt: str, **kw: Any) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, **{"max_tokens": MAX, "temperature": 0.0, **kw})


def _texts(runs: list[list[Token]]) -> list[str]:
    return ["".join(t.text for t in tokens) for tokens in runs]


def test_ngram_index_drafts_what_followed_the_latest_match() -> None:
    index = NgramIndex()
    index.extend([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3])
    assert index.draft(2) == [5, 6]  # (2, 3) last continued with 5 (the longest suffix seen wins)
    index.extend([5])
    assert index.draft(8) == [6, 2, 3, 5]  # (2, 3, 5) continued with 6, then what follows, to the end
    assert NgramIndex().draft(4) == []


def test_greedy_identical_and_drafts_accepted(plain: MlxBackend, ngram: MlxBackend) -> None:
    requests = [_greedy(EDIT), _greedy("Once upon a time"), _greedy(EDIT, max_tokens=7)]
    before = ngram.spec_stats.accepted
    expected, got = batched(plain, requests), batched(ngram, requests)
    assert _texts(got) == _texts(expected)
    assert [len(t) for t in got] == [len(t) for t in expected]
    assert ngram.spec_stats.accepted > before, "the edit prompt's drafts were all rejected"
    extras = ngram.info().extras
    assert extras["accepted_tokens"] == ngram.spec_stats.accepted <= extras["drafted_tokens"]
    assert plain.spec_stats.drafted == 0


def test_speculating_and_plain_sequences_share_a_batch(plain: MlxBackend, ngram: MlxBackend) -> None:
    """Requests speculation cannot serve exactly (logprobs, penalties, sampling, a grammar) decode
    plainly next to speculating ones, each with the answer it gets without speculation."""
    requests = [
        _greedy(EDIT),
        _greedy(EDIT, logprobs=True, top_logprobs=2),
        _greedy(EDIT, repeat_penalty=1.3),
        GenerationRequest(prompt=EDIT, max_tokens=MAX, temperature=0.9, seed=7),
    ]
    expected, got = batched(plain, requests), batched(ngram, requests)
    assert _texts(got) == _texts(expected)
    assert [[t.logprob for t in run] for run in got] == [[t.logprob for t in run] for run in expected]


def test_removed_mid_chunk_leaves_the_others_and_the_prefix_cache_sound(plain: MlxBackend, ngram: MlxBackend) -> None:
    """A stop string ends a sequence between the tokens one forward accepted; what the cache
    holds then goes to the prefix cache, and a later request reusing it answers as before."""
    request = _greedy(EDIT)
    expected = _texts(batched(plain, [request]))[0]
    ngram.reset_prefix_cache()
    batch = ngram.open_batch()
    try:
        batch.add(0, ngram.prepare(request))
        batch.add(1, ngram.prepare(request))
        texts: dict[int, list[str]] = {0: [], 1: []}
        while len(texts[1]) < 5:
            for key, token in batch.step():
                assert isinstance(token, Token)
                texts[key].append(token.text)
        batch.remove(1)
        while len(texts[0]) < MAX:
            steps = batch.step()
            assert steps, "the remaining sequence stalled"
            for key, token in steps:
                assert key == 0 and isinstance(token, Token)
                texts[key].append(token.text)
    finally:
        batch.close()
    assert "".join(texts[0]) == expected
    assert "".join(texts[1]) == expected[: len("".join(texts[1]))]
    assert len(ngram.prefix_cache) > 0
    again = ngram.open_batch()  # starts from the stored cache (no reset)
    try:
        again.add(0, ngram.prepare(request))
        tokens: list[Token] = []
        for _ in range(10 * MAX):  # bounded: a stalled sequence fails the length check below
            tokens += [t for _, t in again.step() if isinstance(t, Token)]
            if len(tokens) == MAX:
                break
    finally:
        again.close()
    assert tokens[0].cached_tokens > 0
    assert "".join(t.text for t in tokens) == expected


def test_draft_mode_is_refused_at_load(tiny_mlx_model: Path) -> None:
    backend = MlxBackend(TierSettings(name="light", speculative="draft"), str(tiny_mlx_model))
    with pytest.raises(ModelUnavailableError, match="draft"):
        backend.load()
