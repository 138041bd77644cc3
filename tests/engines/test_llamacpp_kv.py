"""The llama.cpp engine's KV cache: its settings reach llama.cpp, and memory that cannot be cut
back (Gemma 3's sliding-window layers at their window size, without SWA_FULL; a Mamba state)
still lets a conversation reuse its prefix, through context checkpoints.

Real Gemma 3 270M GGUF: 18 layers, of which 15 sliding-window ones (window 512); a tiny random
Mamba GGUF built at test time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

pytest.importorskip("llama_cpp")

import llama_cpp

from backends.base import Chunk, DecodeState, GenerationRequest, Token
from backends.llamacpp.backend import LlamaCppBackend
from backends.llamacpp.kv_layout import default_kv_tokens, kv_bytes_per_token
from backends.llamacpp.kv_slots import CHECKPOINT_TAIL
from kernel.config import TierSettings
from tests.fixtures.tiny_mamba import build_tiny_mamba

TIER = TierSettings(name="light", n_ctx=2048, n_batch=256, max_batch=2)


def loaded(path: str, **settings: Any) -> LlamaCppBackend:
    backend = LlamaCppBackend(msgspec.structs.replace(TIER, **settings), path)
    backend.load()
    return backend


@pytest.fixture(scope="module")
def llama(gemma_gguf: str) -> Iterator[LlamaCppBackend]:
    backend = loaded(gemma_gguf)
    yield backend
    backend.close()


def kv_bytes(path: str, **settings: Any) -> int:
    backend = loaded(path, **settings)
    try:
        assert backend.kv_bytes is not None
        return backend.kv_bytes
    finally:
        backend.close()


def test_kv_settings_reach_llama_cpp(llama: LlamaCppBackend, gemma_gguf: str) -> None:
    base = llama.kv_bytes
    assert base is not None and base > 0
    assert llama.info().extras["kv_bytes"] == base
    assert llama.info().context_length == TIER.n_ctx  # 2 sequences x 2048 tokens by default
    # q8_0 stores 34 bytes per 32 values where f16 stores 64: the whole cache shrinks by that much.
    quantized = kv_bytes(gemma_gguf, kv_type_k="q8_0", kv_type_v="q8_0", flash_attn="on")
    assert quantized == pytest.approx(base * 34 / 64, rel=1e-3)
    # Half the pool: the full-attention layers' cells halve, the windows stay; the window is smaller.
    half = loaded(gemma_gguf, kv_tokens=TIER.n_ctx)
    try:
        assert half.kv_bytes is not None and half.kv_bytes < base
        assert half.info().context_length == TIER.n_ctx // 2
    finally:
        half.close()
    # SWA_FULL keeps every position in the sliding-window layers too: several times the KV.
    assert kv_bytes(gemma_gguf, swa_full=True) > 2 * base


def chat(backend: LlamaCppBackend, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, list[Chunk]]:
    chunks = list(backend.stream(GenerationRequest(messages=messages, max_tokens=max_tokens, temperature=0.0)))
    return "".join(c.text for c in chunks), chunks


def usage_of(chunks: list[Chunk]) -> tuple[int, int]:
    usage = chunks[-1].usage
    assert usage is not None
    return usage.prompt_tokens, usage.cached_tokens


# Longer than the 512-token window, so the window has dropped the conversation's start.
HISTORY = [{"role": "user", "content": "Describe the weather in Paris in spring, in detail. " * 60}]


def test_second_turn_reuses_the_prefix_past_the_window(llama: LlamaCppBackend) -> None:
    llama.reset_prefix_cache()
    first, chunks = chat(llama, HISTORY, 16)
    prompt_tokens, _ = usage_of(chunks)
    assert prompt_tokens > 600
    turn = [*HISTORY, {"role": "assistant", "content": first}, {"role": "user", "content": "And in autumn?"}]
    warm, chunks = chat(llama, turn, 16)
    _, cached = usage_of(chunks)
    assert cached >= prompt_tokens
    llama.reset_prefix_cache()
    cold, chunks = chat(llama, turn, 16)
    assert usage_of(chunks)[1] == 0
    assert warm == cold


def test_a_checkpoint_serves_a_prefix_the_window_has_moved_past(llama: LlamaCppBackend) -> None:
    """The same prompt again after a long answer: the window now holds the answer's end, so the
    prompt's state comes back from the checkpoint taken just before its end."""
    llama.reset_prefix_cache()
    _, chunks = chat(llama, HISTORY, 1)  # the cold answer's first token, and its checkpoint
    prompt_tokens, _ = usage_of(chunks)
    cold = chunks[0].text
    slot = max(llama.kv_slots.slots, key=lambda s: s.used)
    assert [c.n_tokens for c in slot.checkpoints] == [prompt_tokens - CHECKPOINT_TAIL]
    # A long answer moves the window far past the prompt's end ...
    request = GenerationRequest(prompt=llama.detokenize(slot.tokens) + " The end." * 120, max_tokens=1, temperature=0.0)
    list(llama.stream(request))
    # ... and the same conversation again still reuses all but the checkpointed tail.
    again, chunks = chat(llama, HISTORY, 1)
    assert usage_of(chunks) == (prompt_tokens, prompt_tokens - CHECKPOINT_TAIL)
    assert again == cold


def test_default_pool_fits_the_free_memory(llama: LlamaCppBackend, caplog: pytest.LogCaptureFixture) -> None:
    """Unset, KV_TOKENS is N_CTX per sequence, lowered (whole 256-token stream blocks, logged) to
    what fits 90% of the free memory of the KV's device."""
    model = llama._model
    per_token = kv_bytes_per_token(TIER, model)
    assert per_token == 18 * 1 * (256 * 2 + 256 * 2)  # Gemma 3 270M: 18 layers, 1 KV head of 256, f16
    wanted = TIER.n_ctx * 2
    assert default_kv_tokens(TIER, model, 2, gpu_free=2**40) == wanted
    with caplog.at_level("WARNING", logger="backends.llamacpp.kv_layout"):
        capped = default_kv_tokens(TIER, model, 2, gpu_free=int(1536 * per_token / 0.9) + 1)
    assert capped == 1536 - 1536 % 512  # a whole number of 256-token blocks per sequence
    assert "LIGHT_KV_TOKENS" in caplog.text


def test_recurrent_model_reuses_a_prefix_from_a_checkpoint(tmp_path: Path) -> None:
    """A Mamba state holds only its last position: a prompt that shares all but the previous
    answer (the same question again) restarts from the prompt's checkpoint, not from nothing,
    and answers as a cold run does."""
    backend = LlamaCppBackend(
        TierSettings(name="light", n_ctx=512, n_batch=64, max_batch=2), str(build_tiny_mamba(tmp_path / "m.gguf"))
    )
    backend.load()
    try:

        def run(prompt: str) -> tuple[str, int, int]:
            chunks = list(backend.stream(GenerationRequest(prompt=prompt, max_tokens=8, temperature=0.0)))
            return "".join(c.text for c in chunks), *usage_of(chunks)

        prompt = "the cat sat on the mat and the dog ran in the park. " * 3
        cold, prompt_tokens, cached = run(prompt)
        assert cached == 0
        again, _, cached = run(prompt)
        assert cached == prompt_tokens - CHECKPOINT_TAIL
        assert again == cold
    finally:
        backend.close()


def test_an_idle_stream_between_busy_ones_gets_a_filler_and_keeps_its_kv(gemma_gguf: str) -> None:
    """Streams 0 and 2 decode while 1 is idle: a throwaway token in stream 1 makes the step one
    graph; it changes neither what the others generate nor what slot 1 holds."""
    backend = loaded(gemma_gguf, max_batch=3, n_ctx=512)
    try:
        prompts = [backend.encode(p) for p in ("1, 2, 3, 4, 5,", "Monday, Tuesday, Wednesday,", "A B C D E F")]

        def alone(prompt: list[int]) -> list[str]:
            backend.reset_prefix_cache()
            batch = backend.open_batch()
            batch.add(0, DecodeState(prompt, GenerationRequest(prompt="", max_tokens=12, temperature=0.0), 12))
            texts = []
            while batch.pending(0):
                texts += [t.text for _, t in batch.step() if isinstance(t, Token)]
            return texts

        expected = [alone(p) for p in prompts]
        backend.reset_prefix_cache()
        kv_slots = backend.kv_slots
        filled: list[list[tuple[int, int, int]]] = []
        unfill = kv_slots.unfill
        kv_slots.unfill = lambda fillers: (filled.append(fillers), unfill(fillers))  # type: ignore[method-assign]
        batch = backend.open_batch()
        for key, prompt in enumerate(prompts):
            batch.add(key, DecodeState(prompt, GenerationRequest(prompt="", max_tokens=12, temperature=0.0), 12))
        middle = next(k for k, s in batch._sequences.items() if s.slot.seq == 1)
        got: dict[int, list[str]] = {0: [], 1: [], 2: []}
        for key, token in batch.step():  # the prompts, up to their checkpoints
            if isinstance(token, Token):
                got[key].append(token.text)
        batch.remove(middle)
        while any(batch.pending(k) for k in range(3)):
            for key, token in batch.step():
                if isinstance(token, Token):
                    got[key].append(token.text)
        del kv_slots.unfill
        assert all(got[k] == expected[k] for k in range(3) if k != middle)
        assert any(fillers and fillers[0][0] == 1 for fillers in filled)
        idle = kv_slots.slots[1]
        memory = llama_cpp.llama_get_memory(backend.context)
        assert llama_cpp.llama_memory_seq_pos_max(memory, idle.seq) == len(idle.tokens) - 1
    finally:
        backend.close()


@pytest.mark.parametrize("swa_full", [True, False])
def test_a_prefix_is_shared_from_a_busy_slot(gemma_gguf: str, swa_full: bool) -> None:
    """Two prompts with one long start, the first in a busy slot: the second copies that prefix
    into its own stream (with SWA_FULL a whole-stream copy on the device, without it through
    host memory, window included) and answers as it does cold."""
    backend = loaded(gemma_gguf, swa_full=swa_full)
    try:
        history = backend.encode("A conversation about the weather in the city. " * 12)
        first, second = history + backend.encode(" Sunny?")[1:], history + backend.encode(" Windy?")[1:]

        def run(batch: Any, prompts: dict[int, list[int]]) -> dict[int, list[Token]]:
            for key, prompt in prompts.items():
                request = GenerationRequest(prompt="", max_tokens=8, temperature=0.0)
                batch.add(key, DecodeState(prompt, request, 8))
            got: dict[int, list[Token]] = {key: [] for key in prompts}
            while any(batch.pending(key) for key in prompts):
                for key, token in batch.step():
                    if isinstance(token, Token):
                        got[key].append(token)
            return got

        backend.reset_prefix_cache()
        cold = [t.text for t in run(backend.open_batch(), {0: second})[0]]
        backend.reset_prefix_cache()
        run(backend.open_batch(), {0: first})  # the history, in one slot
        got = run(backend.open_batch(), {0: first, 1: second})  # `first` takes that slot back
        assert got[1][0].cached_tokens >= len(history) - 1
        assert [t.text for t in got[1]] == cold
    finally:
        backend.close()
