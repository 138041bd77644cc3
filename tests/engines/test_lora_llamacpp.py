"""LoRA adapters on the llama.cpp engine, with adapters built at test time for the real Gemma 3 270M.

llama.cpp sets adapters per context, so the batch decodes one adapter group per step: requests
with different adapters, submitted together, must each get exactly what they get alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from backends.base import Chunk, GenerationRequest
from backends.llamacpp.adapters import read_lora_header
from backends.llamacpp.backend import LlamaCppBackend
from kernel.config import TierSettings
from kernel.errors import AdapterNotFoundError, InvalidRequestError
from tests.batching import alone, together
from tests.fixtures.lora import build_gguf_lora

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def loras(gemma_gguf: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lora-gguf")
    return {
        "zero": build_gguf_lora(gemma_gguf, folder / "zero.gguf", zero=True),
        "random": build_gguf_lora(gemma_gguf, folder / "random.gguf", zero=False, seed=2, scale=0.1),
        "other": build_gguf_lora(gemma_gguf, folder / "other.gguf", zero=False, seed=2, scale=0.03),
    }


@pytest.fixture(scope="module")
def llama(gemma_gguf: str, loras: dict[str, Path]) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend(TierSettings(name="light", n_ctx=512, n_batch=64, max_batch=4), gemma_gguf)
    backend.load()
    for name, path in loras.items():
        backend.load_adapter(name, str(path))
    yield backend
    backend.close()


def greedy(adapter: str | None, prompt: str = PROMPT, max_tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0, adapter=adapter)


def test_header_gives_rank_and_kind(loras: dict[str, Path], gemma_gguf: str) -> None:
    header = read_lora_header(str(loras["random"]))
    assert (header.kind, header.adapter_type, header.architecture, header.rank) == ("adapter", "lora", "gemma3", 4)
    assert read_lora_header(gemma_gguf).kind != "adapter"


def test_zero_adapter_changes_nothing_and_random_one_does(llama: LlamaCppBackend) -> None:
    base = alone(llama, greedy(None))
    assert alone(llama, greedy("zero")) == base
    changed = alone(llama, greedy("random"))
    assert changed != base
    assert alone(llama, greedy(None)) == base  # the adapter was taken off the context again
    assert llama.adapter_names() == ["other", "random", "zero"]


def test_different_adapters_in_one_batch_each_get_their_own_output(llama: LlamaCppBackend) -> None:
    # Prompts whose greedy tokens each lead the runner-up by >= 0.13 nats under their adapter:
    # llama.cpp's CPU kernels are not batch-invariant (a sequence's KV cells sit elsewhere in the
    # shared cache), so a near-tie could flip; a wrong adapter changes these outright.
    requests = [
        greedy(None, "1, 2, 3, 4, 5, 6,"),
        greedy("random", "A B C D E F G"),
        greedy("other", "Monday, Tuesday, Wednesday,"),
        greedy(None, "A B C D E F G"),
        greedy("zero", "1, 2, 3, 4, 5, 6,"),
    ]
    expected = [alone(llama, r) for r in requests]
    assert expected[1] != expected[3]
    assert expected[2] != alone(llama, greedy(None, "Monday, Tuesday, Wednesday,"))
    assert together(llama, requests) == expected
    assert all(not s.busy for s in llama.kv_slots.slots)


def test_prefix_is_reused_only_with_the_same_adapter(llama: LlamaCppBackend) -> None:
    llama.reset_prefix_cache()
    history = "A conversation about the weather in the city. " * 4

    def cached(adapter: str | None, tail: str) -> int:
        chunks: list[Chunk] = list(llama.stream(greedy(adapter, history + tail, 2)))
        usage = chunks[-1].usage
        assert usage is not None
        return usage.cached_tokens

    assert cached("random", "Rain?") == 0
    assert cached(None, "Rain? Sun?") == 0  # the KV computed with the adapter is not the base model's
    assert cached(None, "Rain? Sun? Wind?") > 10
    # Adapter requests reuse no KV for now (see KvSlots.acquire), not even their own adapter's.
    assert cached("random", "Rain? Wind?") == 0
    assert cached("other", "Rain? Snow?") == 0


def test_unknown_bad_and_unloaded_adapters(llama: LlamaCppBackend, gemma_gguf: str, tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFoundError) as err:
        list(llama.stream(greedy("nope")))
    assert err.value.code == "adapter_not_found" and err.value.status == 404
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)  # a header claiming 2^64 tensors
    for path in (str(junk), gemma_gguf, str(tmp_path / "missing.gguf")):
        with pytest.raises(InvalidRequestError) as bad:
            llama.load_adapter("bad", path)
        assert bad.value.code == "invalid_adapter"
    with pytest.raises(InvalidRequestError):
        llama.load_adapter("zero", gemma_gguf)  # already loaded under that name
    base = alone(llama, greedy(None))
    llama.unload_adapter("other")
    assert "other" not in llama.adapter_names()
    with pytest.raises(AdapterNotFoundError):
        list(llama.stream(greedy("other")))
    assert alone(llama, greedy(None)) == base
