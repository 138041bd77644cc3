"""The llama.cpp engine on llama.cpp's C API, in-process with the real Gemma 3 270M GGUF.

Batched decoding must not change what a request gets: greedy and seeded outputs are the same
alone and batched, grammars and sampling options apply per sequence, a cancelled sequence gives
its slot back, and a prompt that starts like an earlier one reuses its KV.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence

import pytest

pytest.importorskip("llama_cpp")

import llama_cpp

from backends.base import RANDOM_SEED, Chunk, DecodeState, GenerationRequest, ResponseFormat, Token
from backends.llamacpp import batch as llamacpp_batch
from backends.llamacpp.backend import LlamaCppBackend
from kernel.config import TierSettings
from kernel.errors import InvalidRequestError
from service.tiers.workers import GenerationWorker

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "enum": [1, 2, 3]}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llama(gemma_gguf: str) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend(TierSettings(name="light", n_ctx=1024, n_batch=64, max_batch=4), gemma_gguf)
    backend.load()
    yield backend
    backend.close()


def greedy(prompt: str, max_tokens: int = 16, **kw: object) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0, **kw)  # type: ignore[arg-type]


def alone(backend: LlamaCppBackend, request: GenerationRequest) -> list[Chunk]:
    backend.reset_prefix_cache()  # a cold prompt, as in a fresh batch
    return list(backend.stream(request))


def batched(backend: LlamaCppBackend, requests: Sequence[GenerationRequest]) -> list[list[Chunk]]:
    """Submit every request at once to a real worker (continuous batching) and collect each stream."""
    backend.reset_prefix_cache()

    async def main() -> list[list[Chunk]]:
        streams = [worker.submit(r) for r in requests]
        out = []
        for s in streams:
            try:
                out.append([c async for c in s])
            except InvalidRequestError as exc:
                out.append([Chunk(f"error: {exc.message}")])
        return out

    worker = GenerationWorker("light", backend, max_queue=16)
    try:
        return asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        worker.close()


def text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


# Continuations the model is sure of. llama.cpp's CPU kernels are not batch-invariant (a matmul over
# one row and over several take different code paths, and a sequence's KV cells sit elsewhere in a
# shared cache), so a near-tie between two tokens can flip between a lone and a batched run, in
# llama-server too; a mix-up of positions, sequences or samplers changes these outright.
SURE = [
    ("1, 2, 3, 4, 5, 6,", 24),
    ("Monday, Tuesday, Wednesday,", 12),
    ("January, February, March, April,", 16),
    ("The weather today is sunny with a light wind. " * 8, 12),  # prefilled in several pieces
    ("A B C D E F G", 20),
    ("one two three four five", 5),
]


def test_batched_greedy_equals_unbatched(llama: LlamaCppBackend) -> None:
    requests = [greedy(p, n) for p, n in SURE]
    requests[2] = greedy(SURE[2][0], SURE[2][1], stop=(" July",))
    requests[4] = greedy(SURE[4][0], SURE[4][1], repeat_penalty=1.3)
    expected = [alone(llama, r) for r in requests]
    got = batched(llama, requests)  # six requests, four slots: two join a running batch
    assert [text(c) for c in got] == [text(c) for c in expected]
    assert [c[-1].finish_reason for c in got] == [c[-1].finish_reason for c in expected]

    def counts(runs: list[list[Chunk]]) -> list[tuple[int, int]]:
        return [(u.prompt_tokens, u.completion_tokens) for c in runs if (u := c[-1].usage)]

    assert counts(got) == counts(expected)  # cached_tokens may differ: a batch shares prefixes
    assert expected[2][-1].finish_reason == "stop" and " July" not in text(expected[2])
    assert all(not s.busy for s in llama.kv_slots.slots)


def test_seeded_request_equals_itself_batched(llama: LlamaCppBackend) -> None:
    seeded = GenerationRequest(prompt="Monday, Tuesday,", max_tokens=8, temperature=1.0, top_k=40, seed=7)
    reference = text(alone(llama, seeded))
    assert text(alone(llama, seeded)) == reference
    # Each sequence draws from its own seeded RNG: the same seeded request twice in one batch, with
    # unseeded neighbours drawing between them, draws the same tokens. (Against `reference` a draw
    # near a tie may flip: the kernels are not batch-invariant, see SURE.)
    others = [GenerationRequest(prompt=f"{p}", max_tokens=12, temperature=1.0) for p, _ in SURE[:2]]
    got = batched(llama, [others[0], seeded, others[1], seeded])
    assert text(got[1]) == text(got[3]) and text(got[1])
    draws = {
        text(alone(llama, GenerationRequest(prompt="She said", max_tokens=8, temperature=1.0, seed=s)))
        for s in range(4)
    }
    assert len(draws) > 1  # the seed does pick the draw
    random = GenerationRequest(prompt="She said", max_tokens=8, temperature=1.0, seed=RANDOM_SEED)
    assert len({text(alone(llama, random)) for _ in range(3)}) > 1  # llama.cpp's "random seed"


def test_grammar_applies_per_sequence(llama: LlamaCppBackend) -> None:
    plain = greedy(*SURE[0])
    structured = greedy("Give me JSON:", 80, response_format=ResponseFormat("json_schema", SCHEMA))
    any_object = greedy("An object:", 60, response_format=ResponseFormat("json_object"))
    expected = text(alone(llama, plain))
    got = batched(llama, [plain, structured, any_object])
    assert text(got[0]) == expected
    value = json.loads(text(got[1]))
    assert set(value) == {"ok", "n"} and value["n"] in (1, 2, 3)
    assert got[1][-1].finish_reason == "stop"  # the grammar completed: a natural end
    assert text(got[2]).lstrip().startswith("{")


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "integer"}, 56088),
        ({"type": "number"}, 56088),
        ({"type": "array", "items": {"type": "integer"}}, list),
        ({"type": "boolean"}, bool),
        ({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}, dict),
    ],
)
def test_structured_value_ends_when_the_model_ends_it(
    llama: LlamaCppBackend, schema: dict[str, object], expected: object
) -> None:
    """A value the grammar could end early (a number after its first digit) goes on while the model
    extends it; every root still ends by itself, without trailing whitespace."""
    ask = ({"role": "user", "content": "Reply with the number 56088 and nothing else."},)
    request = GenerationRequest(
        messages=ask, max_tokens=40, temperature=0.0, response_format=ResponseFormat("json_schema", schema)
    )
    chunks = alone(llama, request)
    answer = text(chunks)
    value = json.loads(answer)
    assert chunks[-1].finish_reason == "stop" and answer == answer.strip()
    assert isinstance(value, expected) if isinstance(expected, type) else value == expected


def test_structured_value_ends_where_the_grammar_allows_nothing_more(llama: LlamaCppBackend) -> None:
    """A model pushed to extend an integer for ever is stopped by the grammar (16 digits at most)."""
    five = llama.encode("5")[-1]
    request = greedy(
        "Number:", 40, logit_bias=((five, 100.0),), response_format=ResponseFormat("json_schema", {"type": "integer"})
    )
    chunks = alone(llama, request)
    assert text(chunks) == "5" * 16 and chunks[-1].finish_reason == "stop"


def test_bad_schema_fails_only_its_request(llama: LlamaCppBackend) -> None:
    bad = greedy("x", 8, response_format=ResponseFormat("json_schema", {"type": "object", "properties": 5}))
    good = greedy(*SURE[1])
    got = batched(llama, [good, bad, good])
    assert text(got[1]).startswith("error:")
    assert text(got[0]) == text(got[2]) == text(alone(llama, good))
    with pytest.raises(InvalidRequestError) as err:
        list(llama.stream(bad))
    assert err.value.param == "response_format"


def test_cancelled_sequence_gives_its_slot_back(llama: LlamaCppBackend) -> None:
    llama.reset_prefix_cache()
    batch = llama.open_batch()
    prompt = llama.encode("The weather today is sunny with a light wind. " * 8)
    batch.add(1, DecodeState(prompt, greedy("", 100), 100))
    batch.add(2, DecodeState(llama.encode("Hello"), greedy("", 100), 100))
    for _ in range(4):
        batch.step()
    slots = llama.kv_slots.slots
    assert sum(s.busy for s in slots) == 2
    batch.remove(1)
    assert sum(s.busy for s in slots) == 1
    memory = llama_cpp.llama_get_memory(llama.context)
    for s in slots:  # what each slot says it holds is exactly what its KV holds
        assert llama_cpp.llama_memory_seq_pos_max(memory, s.seq) == len(s.tokens) - 1
    batch.close()
    llama.reset_prefix_cache()
    assert all(llama_cpp.llama_memory_seq_pos_max(memory, s.seq) == -1 for s in slots)


def test_follow_up_reuses_the_prefix(llama: LlamaCppBackend) -> None:
    llama.reset_prefix_cache()
    history = "A conversation about the weather in the city. " * 6
    first = list(llama.stream(greedy(history + "Will it rain?", 4)))
    follow = list(llama.stream(greedy(history + "Will it rain? And tomorrow?", 4)))
    used = first[-1].usage
    usage = follow[-1].usage
    assert used is not None and usage is not None
    assert usage.cached_tokens >= used.prompt_tokens - 2 and usage.cached_tokens < usage.prompt_tokens
    # Two new requests at once with the same long start: the second shares the first's cells.
    a, b = batched(llama, [greedy(history + "Sunny?", 2), greedy(history + "Windy?", 2)])
    assert a[-1].usage is not None and b[-1].usage is not None


def test_a_short_request_keeps_a_long_conversation_cached(llama: LlamaCppBackend) -> None:
    """A request sharing only a few tokens with a long conversation (an agent's side request) takes
    another slot: the conversation's next turn still reuses its whole prefix."""
    llama.reset_prefix_cache()
    history = "An agent's long system prompt, with its tools described at length. " * 8
    first = list(llama.stream(greedy(history + "First turn.", 2)))
    list(llama.stream(greedy("An agent asks for a title.", 2)))  # shares only the first tokens
    follow = list(llama.stream(greedy(history + "First turn. Second turn.", 2)))
    used, usage = first[-1].usage, follow[-1].usage
    assert used is not None and usage is not None
    assert usage.cached_tokens >= used.prompt_tokens - 2


def test_logprobs_and_logit_bias(llama: LlamaCppBackend) -> None:
    llama.reset_prefix_cache()
    prompt = llama.encode("The capital of France is")
    request = greedy("", 4, logprobs=True, top_logprobs=3)
    tokens: list[Token] = list(llama.decode(prompt, request, 4))
    assert len(tokens) == 4
    for t in tokens:
        assert t.logprob is not None and t.logprob.logprob <= 0.0
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert t.logprob.logprob == pytest.approx(t.top_logprobs[0].logprob)  # greedy takes the best
    first = llama.encode(tokens[0].text)[-1]
    banned = list(llama.decode(prompt, greedy("", 1, logit_bias=((first, -100.0),)), 1))
    assert banned[0].text != tokens[0].text
    forced = llama.encode(" banana")[-1]
    pushed = list(llama.decode(prompt, greedy("", 1, logit_bias=((forced, 100.0),)), 1))
    assert pushed[0].text == " banana"


def test_logprobs_carry_each_tokens_bytes(llama: LlamaCppBackend) -> None:
    """A byte token (Gemma's <0xF0>, part of a 4-byte character) has its own byte, not U+FFFD's."""
    llama.reset_prefix_cache()
    prompt = llama.encode("Repeat: \U00013000 \U00013000")
    lead = llama.encode("\U00013000")[-4]
    request = greedy("", 4, logprobs=True, top_logprobs=2, logit_bias=((lead, 100.0),))
    tokens = list(llama.decode(prompt, request, 4))
    assert [t.logprob.raw for t in tokens if t.logprob] == [b"\xf0"] * 4
    assert all(t.logprob and t.logprob.token == "\ufffd" for t in tokens)
    alternatives = [a for t in tokens for a in t.top_logprobs]  # scored before the bias: others
    assert len(alternatives) == 8 and all(a.raw.decode("utf-8", errors="replace") == a.token for a in alternatives)


def test_a_piece_longer_than_the_buffer_comes_whole(llama: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma's longest piece is 48 bytes: with a 16-byte buffer it stands for a piece longer than
    the real buffer, and must come whole in the text and the logprobs."""
    monkeypatch.setattr(llamacpp_batch, "PIECE_BUFFER", 16)
    ellipses = "\u2026" * 16
    (long,) = llama.encode(ellipses)[-1:]
    assert llama.detokenize([long]) == ellipses
    request = greedy("", 1, logprobs=True, logit_bias=((long, 100.0),))
    (token,) = llama.decode(llama.encode("Wait"), request, 1)
    assert token.text == ellipses and token.logprob is not None and token.logprob.raw == ellipses.encode()


def test_presence_and_frequency_penalties_change_sampling(llama: LlamaCppBackend) -> None:
    base = greedy("Numbers: 1 1 1 1 1 1", 16)
    penalised = greedy("Numbers: 1 1 1 1 1 1", 16, presence_penalty=1.5, frequency_penalty=1.5)
    assert text(alone(llama, base)) != text(alone(llama, penalised))


def test_backend_initialised_once_before_any_load(monkeypatch: pytest.MonkeyPatch, gemma_gguf: str) -> None:
    """llama.cpp's process-wide backend is initialised before a model loads, once, even when two
    tiers load at the same moment on two threads (as at start-up)."""
    import threading

    import backends.llamacpp.backend as engine

    calls: list[str] = []
    monkeypatch.setattr(engine, "_backend_ready", False)
    real_init, real_load = llama_cpp.llama_backend_init, llama_cpp.llama_model_load_from_file
    monkeypatch.setattr(llama_cpp, "llama_backend_init", lambda: (calls.append("init"), real_init())[1])

    def load(path: bytes, params: object) -> object:
        calls.append("load")
        return real_load(path, params)

    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", load)
    backends = [LlamaCppBackend(TierSettings(name=f"t{i}", n_ctx=256, max_batch=1), gemma_gguf) for i in range(2)]
    threads = [threading.Thread(target=b.load) for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert calls == ["init", "load", "load"]
        assert all(b.info().device == "cpu" for b in backends)
    finally:
        for b in backends:
            b.close()
