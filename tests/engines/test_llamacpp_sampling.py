"""The llama.cpp engine's sampler against llama.cpp's own chain, on Gemma 3's 262k-token logits.

`Sampler` applies the bias and penalties to the few tokens they touch and runs the truncation and
the draw on the tokens that can survive it; `reference_chain` is llama.cpp's whole chain run by
`llama_sampler_sample` over the whole vocabulary, as the engine sampled before. Both read the same
logits buffer, step after step (the real logits of a prompt, then noisy variations of them), and
must pick the same tokens: greedy, seeded draws, penalties, logit bias and grammars alike.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import pytest

pytest.importorskip("llama_cpp")

import llama_cpp
import numpy as np

from backends.base import Chunk, GenerationRequest, ResponseFormat
from backends.llamacpp.backend import LlamaCppBackend
from backends.llamacpp.sampling import Sampler, logprobs, reference_chain
from kernel.config import TierSettings

PROMPT = "Numbers: 1 1 1 1 1 1"


class Logits:
    """A loaded Gemma whose last logits row the tests overwrite with rows of their choosing."""

    def __init__(self, backend: LlamaCppBackend) -> None:
        self.backend = backend
        self.ctx = backend.context
        self.n_vocab = backend.n_vocab
        self.prompt = backend.encode(PROMPT)
        tokens = (llama_cpp.llama_token * len(self.prompt))(*self.prompt)
        assert llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(tokens, len(self.prompt))) == 0
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        self.row = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        self.real = self.row.copy()

    def rows(self, n: int, seed: int = 0, noise: float = 2.0) -> Iterator[np.ndarray[Any, Any]]:
        """The prompt's own logits, then noisy variations of them, each written into the buffer."""
        rng = np.random.default_rng(seed)
        for i in range(n):
            row = self.real if i == 0 else self.real + (rng.standard_normal(self.n_vocab) * noise).astype(np.float32)
            self.row[:] = row
            yield self.row.copy()


@pytest.fixture(scope="module")
def logits(gemma_gguf: str) -> Iterator[Logits]:
    backend = LlamaCppBackend(TierSettings(name="light", n_ctx=256, n_batch=64, max_batch=1), gemma_gguf)
    backend.load()
    yield Logits(backend)
    backend.close()


def request(**kw: Any) -> GenerationRequest:
    return GenerationRequest(**{"prompt": PROMPT, "max_tokens": 16, **kw})


def same_tokens(logits: Logits, r: GenerationRequest, steps: int = 24, seed: int = 0) -> list[int]:
    """Sample `steps` tokens with `Sampler` and with llama.cpp's chain; assert they agree."""
    sampler = Sampler(logits.backend.vocab, logits.n_vocab, r, logits.prompt)
    chain = reference_chain(logits.n_vocab, r, logits.prompt)
    got = []
    try:
        for row in logits.rows(steps, seed):
            token = sampler.sample(logits.ctx, -1)
            assert np.array_equal(logits.row, row), "the logits row was not put back"
            assert token == llama_cpp.llama_sampler_sample(chain, logits.ctx, -1)
            got.append(token)
    finally:
        sampler.close()
        llama_cpp.llama_sampler_free(chain)
    return got


CASES = {
    "greedy": dict(temperature=0.0),
    "greedy, repeat penalty": dict(temperature=0.0, repeat_penalty=1.3),
    "greedy, presence and frequency": dict(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7),
    "top-k, top-p": dict(temperature=0.8, top_k=40, top_p=0.95, seed=7),
    "top-k, top-p, min-p, penalty": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, seed=8),
    "top-k 200 (bucket sort), presence": dict(temperature=1.0, top_k=200, presence_penalty=0.5, seed=3),
    "top-k 1": dict(temperature=1.0, top_k=1, seed=3),
    "min-p alone": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1, repeat_penalty=1.2, seed=5),
    "top-p alone (whole vocabulary)": dict(temperature=1.0, top_k=0, top_p=0.9, repeat_penalty=1.2, seed=5),
    "no truncation (whole vocabulary)": dict(temperature=1.2, top_k=0, top_p=1.0, frequency_penalty=0.3, seed=9),
}


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_sampler_picks_what_llama_cpp_chain_picks(logits: Logits, options: dict[str, Any]) -> None:
    same_tokens(logits, request(**options))


def test_penalties_and_bias_change_the_pick_as_llama_cpp_does(logits: Logits) -> None:
    """Cases where the adjustments decide the token: the recent best is penalised away, a bias
    pushes a token in or bans the best one, a token named twice in the bias gets both."""
    best = int(logits.real.argmax())
    second = int(np.argsort(logits.real)[-2])
    history = [*logits.prompt, best]
    cases = [
        (dict(temperature=0.0, presence_penalty=100.0), history, second),
        (dict(temperature=0.0, repeat_penalty=100.0), history, None),
        (dict(temperature=0.0, logit_bias=((best, -100.0),)), logits.prompt, second),
        (dict(temperature=0.0, logit_bias=((1234, 100.0),)), logits.prompt, 1234),
        (dict(temperature=0.0, logit_bias=((1234, 60.0), (1234, 60.0))), logits.prompt, 1234),
        (dict(temperature=0.7, top_k=40, seed=1, logit_bias=((1234, 100.0),)), logits.prompt, 1234),
    ]
    for options, prompt, expected in cases:
        r = request(**options)
        sampler = Sampler(logits.backend.vocab, logits.n_vocab, r, prompt)
        chain = reference_chain(logits.n_vocab, r, prompt)
        logits.row[:] = logits.real
        token = sampler.sample(logits.ctx, -1)
        assert token == llama_cpp.llama_sampler_sample(chain, logits.ctx, -1), options
        assert token != best, options
        if expected is not None:
            assert token == expected, options
        sampler.close()
        llama_cpp.llama_sampler_free(chain)


def test_seeded_sampling_is_reproducible(logits: Logits) -> None:
    options = dict(temperature=1.5, top_k=100, top_p=0.99, repeat_penalty=1.1)
    first = same_tokens(logits, request(seed=42, **options), steps=16, seed=5)
    assert first == same_tokens(logits, request(seed=42, **options), steps=16, seed=5)
    assert first != same_tokens(logits, request(seed=43, **options), steps=16, seed=5)


def test_grammar_path_picks_what_the_whole_chain_picks(logits: Logits) -> None:
    """With a grammar: the chain's pick, checked by the grammar, else a draw over the grammar's
    tokens (the engine's algorithm before, on llama.cpp's whole chain)."""
    r = request(temperature=0.9, top_k=40, top_p=0.95, repeat_penalty=1.2, seed=11)
    grammars = logits.backend.grammars
    sampler = Sampler(logits.backend.vocab, logits.n_vocab, r, logits.prompt)
    sampler.attach_grammar(grammars.compile(ResponseFormat("json_object")))
    chain = reference_chain(logits.n_vocab, r, logits.prompt)
    grammar = grammars.compile(ResponseFormat("json_object"))
    cur = np.empty(logits.n_vocab, dtype=np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)]))
    rejected = 0

    def draw(row: np.ndarray[Any, Any], grammar_first: bool) -> int:
        cur["id"], cur["logit"], cur["p"] = np.arange(logits.n_vocab), row, 0.0
        array = llama_cpp.llama_token_data_array(
            cur.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), logits.n_vocab, -1, False
        )
        if grammar_first:
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
        return int(array.data[array.selected].id)

    try:
        for row in logits.rows(40, seed=3, noise=4.0):
            token = sampler.sample(logits.ctx, -1)
            expected = draw(row, grammar_first=False)
            one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(expected, 1.0, 0.0))
            check = llama_cpp.llama_token_data_array(one, 1, -1, False)
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(check))
            if not np.isfinite(one[0].logit):
                rejected += 1
                expected = draw(row, grammar_first=True)
            assert token == expected
            llama_cpp.llama_sampler_accept(grammar, expected)
            llama_cpp.llama_sampler_accept(chain, expected)
            if llama_cpp.llama_vocab_is_eog(logits.backend.vocab, token):
                break
    finally:
        sampler.close()
        llama_cpp.llama_sampler_free(chain)
        llama_cpp.llama_sampler_free(grammar)
    assert rejected, "the grammar never rejected a pick: the test did not reach the second draw"


def test_logprobs_read_the_raw_logits(logits: Logits) -> None:
    """Penalties and bias steer the pick, not the reported log-probabilities."""
    r = request(temperature=0.0, repeat_penalty=1.5, logit_bias=((1234, 100.0),))
    sampler = Sampler(logits.backend.vocab, logits.n_vocab, r, logits.prompt)
    logits.row[:] = logits.real
    token = sampler.sample(logits.ctx, -1)
    sampler.close()
    assert token == 1234
    chosen, top = logprobs(logits.ctx, -1, logits.n_vocab, token, 2, lambda t: str(t).encode())
    raw = logits.real.astype(np.float64)
    norm = raw.max() + np.log(np.exp(raw - raw.max()).sum())
    assert chosen.logprob == pytest.approx(raw[1234] - norm, abs=1e-4)
    assert top[0].token == str(int(raw.argmax()))


# -- sampling in the decode graph (llama_set_sampler) -------------------------------------------


def _loaded(gemma_gguf: str, device_sampling: Literal["on", "off"]) -> Iterator[LlamaCppBackend]:
    tier = TierSettings(name="light", n_ctx=512, n_batch=64, max_batch=3, device_sampling=device_sampling)
    backend = LlamaCppBackend(tier, gemma_gguf)
    backend.load()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def on_device(gemma_gguf: str) -> Iterator[LlamaCppBackend]:
    """Backend sampling works on the CPU too, so the GPU path is tested here."""
    yield from _loaded(gemma_gguf, "on")


@pytest.fixture(scope="module")
def on_host(gemma_gguf: str) -> Iterator[LlamaCppBackend]:
    yield from _loaded(gemma_gguf, "off")


def one_batch(backend: LlamaCppBackend, requests: Sequence[GenerationRequest]) -> list[list[Chunk]]:
    """The requests decoded together from the first step to the last, as the worker decodes them
    but with the batch's make-up fixed (greedy near-ties flip with it: kernels are not
    batch-invariant)."""
    backend.reset_prefix_cache()
    states = [backend.prepare(r) for r in requests]
    out: list[list[Chunk]] = [[] for _ in requests]
    batch = backend.open_batch()
    try:
        for key, state in enumerate(states):
            batch.add(key, state)
        live = set(range(len(states)))
        while live:
            for key, token in batch.step():
                assert not isinstance(token, Exception), token
                state = states[key]
                if token is not None and (chunk := state.add(token)):
                    out[key].append(chunk)
                if token is None or state.done:
                    batch.remove(key)
                    live.discard(key)
                    out[key].extend(state.finish())
    finally:
        batch.close()
    return out


def text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def test_sampling_in_the_graph_matches_the_host(
    on_device: LlamaCppBackend, on_host: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy (with penalties and bias) answers the same from the graph; a request that needs its
    logits row (logprobs) samples on the host in the same batch and still gets its scores."""
    offloaded: list[bool] = []
    offload = Sampler.offload
    monkeypatch.setattr(Sampler, "offload", lambda self, *a: offloaded.append(offload(self, *a)) or offloaded[-1])
    requests = [
        request(prompt="Count: one, two, three,", max_tokens=24, temperature=0.0),
        request(
            prompt="Numbers: 1 1 1 1",
            max_tokens=24,
            temperature=0.0,
            repeat_penalty=1.3,
            frequency_penalty=0.5,
            logit_bias=((236743, -5.0),),
        ),
        request(prompt="The capital of France is", max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=2),
    ]
    device, host = one_batch(on_device, requests), one_batch(on_host, requests)
    assert offloaded == [True, True]  # the logprobs request was never offered
    assert [text(c) for c in device] == [text(c) for c in host]
    scores = [t.logprob.logprob for c in device[2] for t in c.scored if t.logprob]
    assert scores and scores == pytest.approx([t.logprob.logprob for c in host[2] for t in c.scored if t.logprob])


def test_seeded_sampling_in_the_graph_is_reproducible(on_device: LlamaCppBackend) -> None:
    seeded = request(prompt="A story:", max_tokens=24, temperature=1.0, top_k=40, top_p=0.95, seed=5)
    first = text(list(on_device.stream(seeded)))
    assert first == text(list(on_device.stream(seeded)))
    other = request(prompt="A story:", max_tokens=24, temperature=1.0, top_k=40, top_p=0.95, seed=6)
    assert first != text(list(on_device.stream(other)))


def test_an_offloaded_sampler_takes_the_token_the_graph_drew(on_device: LlamaCppBackend) -> None:
    on_device.reset_prefix_cache()  # sequence 0 starts empty, and the batch's slots know it
    ctx, prompt = on_device.context, on_device.encode(PROMPT)
    r = request(temperature=0.0, repeat_penalty=1.5)
    sampler = Sampler(on_device.vocab, on_device.n_vocab, r, prompt)
    try:
        assert sampler.offload(ctx, 0)
        tokens = (llama_cpp.llama_token * len(prompt))(*prompt)
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, len(prompt))) == 0
        drawn = llama_cpp.llama_get_sampled_token_ith(ctx, -1)
        assert drawn != llama_cpp.LLAMA_TOKEN_NULL
        assert sampler.sample(ctx, -1) == drawn
    finally:
        sampler.close()
        on_device.reset_prefix_cache()
