"""Speculative decoding (`SPECULATIVE=ngram` and `draft`) in the MLX batch, on the tiny random
mlx-lm model (its own draft, and a second one with the same tokenizer and other weights).

Speculation must not change a greedy answer: every test compares a speculating batch with the
same requests decoded plainly (`speculative=off`), token for token, with batching on.
"""

from __future__ import annotations

import json
import shutil
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
from tests.fixtures.tiny_mlx import build_tiny_mlx_model

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


@pytest.fixture(scope="module")
def own_draft(tiny_mlx_model: Path) -> Iterator[MlxBackend]:
    """The model as its own draft: greedy drafts are the model's own choices."""
    backend = _backend(tiny_mlx_model, speculative="draft", draft_model_path=str(tiny_mlx_model), draft_tokens=6)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def other_draft(tiny_mlx_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlxBackend]:
    """A draft with the same tokenizer and other weights: most of its drafts are rejected."""
    draft = build_tiny_mlx_model(tmp_path_factory.mktemp("tiny-mlx-draft"), seed=1)
    backend = _backend(tiny_mlx_model, speculative="draft", draft_model_path=str(draft), draft_tokens=4)
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
    """Requests speculation cannot serve exactly (logprobs, penalties, a grammar) decode plainly next
    to speculating ones (greedy, and sampled with a seed), each with the answer it gets without."""
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


def test_own_draft_greedy_identical_and_accepted(plain: MlxBackend, own_draft: MlxBackend) -> None:
    requests = [_greedy(EDIT), _greedy("Once upon a time"), _greedy(EDIT, max_tokens=7)]
    before = own_draft.spec_stats.drafted, own_draft.spec_stats.accepted
    expected, got = batched(plain, requests), batched(own_draft, requests)
    assert _texts(got) == _texts(expected)
    assert [len(t) for t in got] == [len(t) for t in expected]
    drafted, accepted = own_draft.spec_stats.drafted - before[0], own_draft.spec_stats.accepted - before[1]
    # The draft proposes the model's own greedy tokens; only float near-ties between a one-token
    # and a (1 + k)-token forward could reject one.
    assert drafted > 0 and accepted >= 0.9 * drafted, (drafted, accepted)


def test_other_draft_in_a_mixed_batch(plain: MlxBackend, other_draft: MlxBackend) -> None:
    """A draft that is mostly wrong costs time, never tokens: greedy and seeded sampled requests
    speculate next to ones that decode plainly (logprobs, a penalty), each answering as without."""
    requests = [
        _greedy(EDIT),
        _greedy("Once upon a time"),
        _greedy(EDIT, logprobs=True, top_logprobs=2),
        _greedy(EDIT, repeat_penalty=1.3),
        GenerationRequest(prompt=EDIT, max_tokens=MAX, temperature=0.9, seed=3),
    ]
    before = other_draft.spec_stats.drafted, other_draft.spec_stats.accepted
    expected, got = batched(plain, requests), batched(other_draft, requests)
    assert _texts(got) == _texts(expected)
    assert [[t.logprob for t in run] for run in got] == [[t.logprob for t in run] for run in expected]
    drafted, accepted = other_draft.spec_stats.drafted - before[0], other_draft.spec_stats.accepted - before[1]
    assert drafted > accepted, "no draft was rejected: the rejection path went untested"


def test_sampled_requests_speculate_and_keep_their_seeds(plain: MlxBackend, own_draft: MlxBackend) -> None:
    """Sampling speculates too (the sampler picks each position; a draft token stays while the pick
    equals it): a seeded request gives the text it gives decoded plainly, seeds differ, and the
    drafts are sometimes kept and sometimes not (temperature 1 on a model with clear favourites)."""
    requests = [GenerationRequest(prompt=EDIT, max_tokens=24, temperature=1.0, seed=seed) for seed in range(6)]
    before = own_draft.spec_stats.drafted, own_draft.spec_stats.accepted
    expected, got = _texts(batched(plain, requests)), _texts(batched(own_draft, requests))
    assert got == expected
    assert len(set(got)) > 1, "every seed sampled the same text"
    drafted, accepted = own_draft.spec_stats.drafted - before[0], own_draft.spec_stats.accepted - before[1]
    assert 0 < accepted < drafted, (drafted, accepted)


def test_draft_vocabulary_mismatch_refused(tiny_mlx_model: Path, tmp_path: Path) -> None:
    other = build_tiny_mlx_model(tmp_path / "other-vocab", vocab_size=400)
    backend = MlxBackend(
        TierSettings(name="light", speculative="draft", draft_model_path=str(other)), str(tiny_mlx_model)
    )
    with pytest.raises(ModelUnavailableError, match="does not share the vocabulary") as refused:
        backend.load()
    assert str(other) in str(refused.value) and str(tiny_mlx_model) in str(refused.value)
    assert "400 tokens, the model has 512" in str(refused.value)


def test_draft_with_the_same_size_but_other_tokens_refused(tiny_mlx_model: Path, tmp_path: Path) -> None:
    """Two ids swapped: the sizes and special tokens agree, the token strings do not."""
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_mlx_model, swapped)
    data = json.loads((swapped / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = (token for token, i in vocab.items() if i in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(data))
    backend = MlxBackend(
        TierSettings(name="light", speculative="draft", draft_model_path=str(swapped)), str(tiny_mlx_model)
    )
    with pytest.raises(ModelUnavailableError, match="token 300 is"):
        backend.load()


def test_draft_mode_needs_a_draft_model(tiny_mlx_model: Path) -> None:
    backend = MlxBackend(TierSettings(name="light", speculative="draft"), str(tiny_mlx_model))
    with pytest.raises(ModelUnavailableError, match="LIGHT_DRAFT_MODEL_PATH"):
        backend.load()
    missing = MlxBackend(
        TierSettings(name="light", speculative="draft", draft_model_path="/no/such/draft"), str(tiny_mlx_model)
    )
    with pytest.raises(ModelUnavailableError, match="draft model '/no/such/draft': no such folder"):
        missing.load()


def test_one_request_at_a_time_speculates_too(plain: MlxBackend, tiny_mlx_model: Path) -> None:
    """MAX_BATCH=1 (and `stream`) decode without a shared batch: speculation still runs, with the
    answer, the finish reason and the usage of plain decoding, and leaves its cache for the next turn."""
    backend = MlxBackend(
        TierSettings(
            name="light", n_ctx=2048, max_batch=1, n_batch=64, speculative="draft", draft_model_path=str(tiny_mlx_model)
        ),
        str(tiny_mlx_model),
    )
    backend.load()
    try:
        for request in (_greedy(EDIT), _greedy(EDIT, stop=["wolf", "fox"]), _greedy("Once upon a time", max_tokens=9)):
            plain.reset_prefix_cache()
            expected = list(plain.stream(request))
            backend.reset_prefix_cache()
            got = list(backend.stream(request))
            assert "".join(c.text for c in got) == "".join(c.text for c in expected)
            assert (got[-1].finish_reason, got[-1].usage) == (expected[-1].finish_reason, expected[-1].usage)
        assert backend.spec_stats.accepted > 0
        assert len(backend.prefix_cache) > 0
        again = list(backend.stream(_greedy(EDIT)))  # from the stored cache
        assert again[-1].usage is not None and again[-1].usage.cached_tokens > 0
        assert "".join(c.text for c in again) == "".join(c.text for c in plain.stream(_greedy(EDIT)))
    finally:
        backend.close()
