"""Speculative decoding (`SPECULATIVE=ngram`, `draft`) in the llama.cpp batch, on the real Gemma 3 270M GGUF.

Speculation must never change an answer: greedy and seeded output, grammars, logprobs and stop
strings come out as in plain decoding, alone and in a batch of sequences that draft and that do
not; an edit of a text the model was shown accepts drafts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from backends.base import GenerationRequest, ResponseFormat
from backends.llamacpp.backend import LlamaCppBackend
from kernel.config import TierSettings
from kernel.errors import ModelUnavailableError
from tests.engines.test_llamacpp_engine import SCHEMA, SURE, alone, batched, greedy, text
from tests.fixtures.tiny_mamba import build_tiny_mamba

CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
# An edit task: the answer copies most of the prompt, which is what prompt lookup drafts from.
EDIT = (
    "<start_of_turn>user\nRepeat this code exactly, but rename add to plus:\n\n"
    f"{CODE}<end_of_turn>\n<start_of_turn>model\n"
)


def _backend(gguf: str, **settings: object) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend(
        TierSettings(name="light", n_ctx=1024, n_batch=64, max_batch=4, **settings),  # type: ignore[arg-type]
        gguf,
    )
    backend.load()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def plain(gemma_gguf: str) -> Iterator[LlamaCppBackend]:
    yield from _backend(gemma_gguf)


@pytest.fixture(scope="module")
def spec(gemma_gguf: str) -> Iterator[LlamaCppBackend]:
    yield from _backend(gemma_gguf, speculative="ngram", draft_tokens=6)


def counters(backend: LlamaCppBackend) -> dict[str, int]:
    view: dict[str, int] = backend.info().extras["speculative"]
    return view


def test_greedy_output_is_plain_decodings(plain: LlamaCppBackend, spec: LlamaCppBackend) -> None:
    before = counters(spec)
    requests = [greedy(EDIT, 64), *(greedy(p, n) for p, n in SURE[:3])]
    for request in requests:
        assert text(alone(spec, request)) == text(alone(plain, request))
    after = counters(spec)
    assert after["mode"] == "ngram"
    # The edit copies the code it was shown: most of its drafts are accepted.
    assert after["accepted"] - before["accepted"] > 20
    assert after["drafted"] > after["accepted"]  # and the rejected ones were rolled back (output equal)


def test_seeded_sampling_draws_as_plain_decoding(plain: LlamaCppBackend, spec: LlamaCppBackend) -> None:
    # A prompt-lookup draft is kept only where the sampler drew that very token (so a draft token t
    # is accepted with probability p(t), and otherwise the draw comes from p without t): the sampler
    # draws at the same positions from the same distributions, with the same seeded RNG, as without
    # drafts. So a seed draws the same text, except where a draw lands within the kernels' noise of
    # a boundary (a 1 + k token batch computes logits ~1e-2 apart from a 1-token one, as a prefill
    # does: see SURE): a wrong acceptance rule would change most of these draws.
    before = counters(spec)["accepted"]
    same = 0
    for seed in range(8):
        request = GenerationRequest(prompt=EDIT, max_tokens=12, temperature=0.5, top_k=40, seed=seed)
        same += text(alone(spec, request)) == text(alone(plain, request))
    assert same >= 6
    assert counters(spec)["accepted"] > before


def test_grammar_logprobs_and_penalties(plain: LlamaCppBackend, spec: LlamaCppBackend) -> None:
    structured = greedy(
        "Give me JSON:", 80, response_format=ResponseFormat("json_schema", SCHEMA), logprobs=True, top_logprobs=2
    )
    got, expected = alone(spec, structured), alone(plain, structured)
    assert text(got) == text(expected)
    assert set(json.loads(text(got))) == {"ok", "n"}
    penalised = greedy(EDIT, 40, repeat_penalty=1.3, logprobs=True)
    got, expected = alone(spec, penalised), alone(plain, penalised)
    assert text(got) == text(expected)
    # One score per token, drafted or not, for the token output (values within the kernels' noise).
    scored = [t for c in got for t in c.scored]
    assert [t.text for t in scored] == [t.text for c in expected for t in c.scored]
    assert all(t.logprob is not None and t.logprob.token == t.text for t in scored)


def test_batch_of_drafting_and_plain_sequences(plain: LlamaCppBackend, spec: LlamaCppBackend) -> None:
    # The edit drafts most steps, the others seldom: their verification shares each decode step.
    # A stop string inside a run of accepted drafts ends the answer there.
    requests = [
        greedy(EDIT, 48),
        greedy(SURE[0][0], SURE[0][1]),
        greedy(EDIT, 48, stop=("return a - b",)),
        greedy(SURE[2][0], SURE[2][1], stop=(" July",)),
        greedy(SURE[4][0], SURE[4][1], repeat_penalty=1.3),
    ]
    expected = [alone(plain, r) for r in requests]
    got = batched(spec, requests)
    assert [text(c) for c in got] == [text(c) for c in expected]
    assert [c[-1].finish_reason for c in got] == [c[-1].finish_reason for c in expected]
    assert got[2][-1].finish_reason == "stop" and "return a - b" not in text(got[2])
    assert all(not s.busy for s in spec.kv_slots.slots)


def test_device_sampled_sequence_decodes_plainly(gemma_gguf: str, plain: LlamaCppBackend) -> None:
    for backend in _backend(gemma_gguf, speculative="ngram", device_sampling="on"):
        request = greedy(EDIT, 30)
        assert text(alone(backend, request)) == text(alone(plain, request))
        view = counters(backend)
        assert view["fallbacks"] == 1 and view["drafted"] == 0


# -- SPECULATIVE=draft: Gemma drafts for itself ------------------------------------------------


@pytest.fixture(scope="module")
def drafting(gemma_gguf: str) -> Iterator[LlamaCppBackend]:
    yield from _backend(gemma_gguf, speculative="draft", draft_model_path=gemma_gguf, draft_tokens=6)


def test_draft_model_greedy_output_is_plain_decodings(plain: LlamaCppBackend, drafting: LlamaCppBackend) -> None:
    before = counters(drafting)
    # The same prompt twice: the second time the draft's KV of the first is cut back and reused.
    requests = [greedy(EDIT, 24), greedy(SURE[0][0], SURE[0][1]), greedy(EDIT, 24)]
    for request in requests:
        assert text(alone(drafting, request)) == text(alone(plain, request))
    after = counters(drafting)
    assert after["mode"] == "draft" and after["fallbacks"] == before["fallbacks"]
    drafted, accepted = after["drafted"] - before["drafted"], after["accepted"] - before["accepted"]
    # The model drafting for itself proposes its own greedy choices: all but kernel-noise ties are kept.
    assert accepted > 30 and accepted >= 0.9 * drafted


def test_draft_kv_is_cut_back_or_rebuilt_to_the_text(drafting: LlamaCppBackend) -> None:
    # Whatever a sequence id's draft KV held before (a longer text, another conversation), the
    # drafts for a text are those of a fresh sequence. Gemma 3 keeps a 512-token window: a KV that
    # held 900 tokens cannot be cut back to the ~90 it shares and is rebuilt (cut, it lacks their window).
    draft = drafting._draft
    assert draft is not None
    edit = drafting.encode(EDIT)
    long = drafting.encode(EDIT.split("<end_of_turn>")[0] + "The weather today is sunny with a light wind. " * 80)
    fresh = draft.propose([(3, edit, 6)])
    assert len(fresh[0]) == 6
    draft.propose([(0, long, 1), (1, edit[:-8], 2)])
    # Seq 0 is rebuilt past the window; seq 1 keeps its KV and catches up on 8 tokens.
    assert draft.propose([(0, edit, 6), (1, edit, 6)]) == [fresh[0], fresh[0]]
    # (Drafts copying code barely need the window: the rebuild itself is what shows.)
    import llama_cpp

    assert llama_cpp.llama_memory_seq_pos_min(llama_cpp.llama_get_memory(draft.context), 0) == 0


def test_draft_model_seeded_sampling_draws_as_plain_decoding(plain: LlamaCppBackend, drafting: LlamaCppBackend) -> None:
    # The draft is the draft model's argmax (a one-hot q), kept where the target's own seeded
    # sampler drew that token: accepted with p(x) = min(1, p(x)/q(x)), and on a rejection the draw
    # is one from p without x, the residual. So a seed draws plain decoding's text, but where a
    # draw lands within the kernels' noise of a boundary (see the n-gram test); a rule that kept
    # the draft model's choices would draw one text for every seed.
    before = counters(drafting)["accepted"]
    prompt = "<start_of_turn>user\nName five fruits.<end_of_turn>\n<start_of_turn>model\n"
    texts = []
    for seed in range(6):
        request = GenerationRequest(prompt=prompt, max_tokens=10, temperature=0.7, top_k=40, seed=seed)
        texts.append((text(alone(drafting, request)), text(alone(plain, request))))
    assert sum(got == expected for got, expected in texts) >= 4
    assert len({got for got, _ in texts}) >= 4
    assert counters(drafting)["accepted"] > before


def test_draft_model_batch_of_drafting_and_plain_sequences(plain: LlamaCppBackend, drafting: LlamaCppBackend) -> None:
    # Through a real worker: sequences with a grammar, a penalty and a stop string share the decode
    # steps (and the draft model's batched decodes) with the others.
    requests = [
        greedy(EDIT, 24),
        greedy(SURE[0][0], SURE[0][1], stop=(" 9,",)),
        greedy("Give me JSON:", 40, response_format=ResponseFormat("json_schema", SCHEMA)),
        greedy(SURE[4][0], SURE[4][1], repeat_penalty=1.3, logprobs=True),
    ]
    expected = [alone(plain, r) for r in requests]
    before = counters(drafting)["accepted"]
    got = batched(drafting, requests)
    assert [text(c) for c in got] == [text(c) for c in expected]
    assert [c[-1].finish_reason for c in got] == [c[-1].finish_reason for c in expected]
    assert got[1][-1].finish_reason == "stop"
    assert counters(drafting)["accepted"] - before > 20
    assert all(not s.busy for s in drafting.kv_slots.slots)


def test_draft_model_with_another_vocabulary_is_refused(gemma_gguf: str, tmp_path: Path) -> None:
    other = build_tiny_mamba(tmp_path / "tiny-mamba.gguf")
    tier = TierSettings(name="light", n_ctx=256, speculative="draft", draft_model_path=str(other))
    backend = LlamaCppBackend(tier, gemma_gguf)
    with pytest.raises(ModelUnavailableError, match="vocabulary differs") as caught:
        backend.load()
    assert str(other) in caught.value.message and gemma_gguf in caught.value.message
    backend.close()


def test_draft_mode_needs_a_draft_model(gemma_gguf: str) -> None:
    backend = LlamaCppBackend(TierSettings(name="light", speculative="draft"), gemma_gguf)
    with pytest.raises(ModelUnavailableError, match="LIGHT_DRAFT_MODEL_PATH"):
        backend.load()
