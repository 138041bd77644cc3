"""Admission in the llama.cpp batch, on the real Gemma 3 270M GGUF: a prompt shared by several
sequences is prefilled once, and a grammar compiles while its prompt prefills."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest

pytest.importorskip("llama_cpp")

import llama_cpp

from backends.base import Chunk, DecodeState, GenerationRequest, ResponseFormat, common_prefix
from backends.llamacpp import batch as batch_module
from backends.llamacpp.backend import LlamaCppBackend
from kernel.config import TierSettings
from kernel.errors import InvalidRequestError
from service.tiers.workers import GenerationWorker

PROMPT = "The weather today is sunny with a light wind, and the forecast says " * 12 + "1, 2, 3, 4, 5,"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


@pytest.fixture(scope="module")
def llama(gemma_gguf: str) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend(TierSettings(name="light", n_ctx=1024, n_batch=64, max_batch=4), gemma_gguf)
    backend.load()
    yield backend
    backend.close()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The tokens of every `llama_decode` call (prompt and generated), one entry a call."""
    calls: list[int] = []
    real = llama_cpp.llama_decode

    def counting(ctx: Any, batch: Any) -> int:
        calls.append(int(batch.n_tokens))
        return int(real(ctx, batch))

    monkeypatch.setattr(batch_module.llama_cpp, "llama_decode", counting)
    return calls


def greedy(max_tokens: int = 8, **kw: Any) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, max_tokens=max_tokens, temperature=0.0, **kw)


def alone(backend: LlamaCppBackend, request: GenerationRequest) -> list[Chunk]:
    backend.reset_prefix_cache()
    return list(backend.stream(request))


def text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def test_n_choices_prefill_their_prompt_once(llama: LlamaCppBackend, decoded: list[int]) -> None:
    request = greedy()
    expected = text(alone(llama, request))
    prompt = llama.encode(PROMPT)
    decoded.clear()
    llama.reset_prefix_cache()

    async def main() -> list[list[Chunk]]:
        streams = [worker.submit(request) for _ in range(4)]  # what `n: 4` submits
        return [[c async for c in s] for s in streams]

    worker = GenerationWorker("light", llama, max_queue=8)
    try:
        choices = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        worker.close()
    assert [text(c) for c in choices] == [expected] * 4
    # Once the prompt, then for each other choice only its last token (whose logits it samples).
    assert sum(decoded) <= len(prompt) + 3 + 4 * request.max_tokens, (sum(decoded), len(prompt))
    cached = sorted(c[-1].usage.cached_tokens for c in choices if c[-1].usage is not None)
    assert cached == [0, len(prompt) - 1, len(prompt) - 1, len(prompt) - 1]


def test_a_sequence_whose_leader_leaves_mid_prompt_takes_what_it_prefilled(
    llama: LlamaCppBackend, decoded: list[int]
) -> None:
    request = greedy()
    expected = text(alone(llama, request))
    prompt = llama.encode(PROMPT)
    llama.reset_prefix_cache()
    batch = llama.open_batch()
    leader, follower = DecodeState(prompt, request, 8), DecodeState(prompt, request, 8)
    batch.add(0, leader)
    batch.add(1, follower)
    decoded.clear()
    assert batch.step() == [] and decoded == [llama.n_batch]  # the first piece of the prompt, once
    batch.remove(0)  # its client went away
    got = ""
    while not follower.done:
        for _, token in batch.step():
            assert token is not None and not isinstance(token, Exception)
            got += (follower.add(token) or Chunk("")).text
    batch.close()
    assert got + "".join(c.text for c in follower.finish()) == expected
    assert follower.cached == llama.n_batch  # the part its leader prefilled
    assert sum(decoded) <= len(prompt) + 8


def held_grammar(monkeypatch: pytest.MonkeyPatch, llama: LlamaCppBackend) -> Future[Any]:
    """The next grammar `submit` hands out: it compiles only when the test says so."""
    pending: Future[Any] = Future()
    monkeypatch.setattr(llama.grammars, "submit", lambda fmt: pending)
    return pending


def test_a_grammar_compiles_while_its_prompt_prefills(llama: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = ResponseFormat("json_schema", SCHEMA)
    request = greedy(40, response_format=fmt)
    expected = text(alone(llama, request))
    assert json.loads(expected) in ({"ok": True}, {"ok": False})
    prompt = llama.encode(PROMPT)
    llama.reset_prefix_cache()
    pending = held_grammar(monkeypatch, llama)
    batch = llama.open_batch()
    state = DecodeState(prompt, request, 40)
    batch.add(0, state)
    (slot,) = [s for s in llama.kv_slots.slots if s.busy]
    while len(slot.tokens) < len(prompt) - 1:
        assert batch.step() == []
    assert batch.step() == []  # all but the last prompt token: its logits wait for the grammar
    assert len(slot.tokens) == len(prompt) - 1
    pending.set_result(llama.grammars.compile(fmt))
    got = ""
    while not state.done:
        for _, token in batch.step():
            assert token is not None and not isinstance(token, Exception)
            got += (state.add(token) or Chunk("")).text
    batch.close()
    assert got + "".join(c.text for c in state.finish()) == expected


def test_a_grammar_that_never_compiles_is_still_a_400(llama: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_module, "GRAMMAR_TIMEOUT", 0.5)
    held_grammar(monkeypatch, llama)
    llama.reset_prefix_cache()
    batch = llama.open_batch()
    batch.add(0, DecodeState(llama.encode(PROMPT), greedy(8, response_format=ResponseFormat("json_object")), 8))
    for _ in range(200):
        if out := batch.step():
            break
    batch.close()
    [(key, error)] = out
    assert key == 0 and isinstance(error, InvalidRequestError) and error.param == "response_format"
    assert "to compile" in error.message


def test_requests_with_one_system_prompt_prefill_it_once(llama: LlamaCppBackend, decoded: list[int]) -> None:
    requests = [
        GenerationRequest(prompt=PROMPT + ending, max_tokens=4, temperature=0.0) for ending in (" 6,", " 7, 8,")
    ]
    expected = [text(alone(llama, r)) for r in requests]
    prompts = [llama.encode(PROMPT + ending) for ending in (" 6,", " 7, 8,")]
    shared = common_prefix(*prompts)  # all but their endings
    llama.reset_prefix_cache()
    decoded.clear()
    batch = llama.open_batch()
    states = [DecodeState(p, r, 4) for p, r in zip(prompts, requests, strict=True)]
    for key, state in enumerate(states):
        batch.add(key, state)
    texts = ["", ""]
    while not all(s.done for s in states):
        for key, token in batch.step():
            assert token is not None and not isinstance(token, Exception)
            texts[key] += (states[key].add(token) or Chunk("")).text
    batch.close()
    assert [t + "".join(c.text for c in s.finish()) for t, s in zip(texts, states, strict=True)] == expected
    assert states[1].cached == shared
    assert sum(decoded) <= len(prompts[0]) + len(prompts[1]) - shared + 2 * 4
