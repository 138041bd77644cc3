"""The llama.cpp engine's prompt cache on the real Gemma 3 270M GGUF: more conversations than
KV slots, a returning one restored from RAM, then after a restart from disk, each answering as
a cold run does; clearing empties both tiers."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

pytest.importorskip("llama_cpp")

from backends.base import Chunk, GenerationRequest
from backends.llamacpp.backend import LlamaCppBackend
from kernel.config import TierSettings

TIER = TierSettings(name="light", n_ctx=1024, n_batch=256, max_batch=2)
TOPICS = ["the weather in Paris", "growing tomatoes", "the history of Rome", "how a bicycle works"]


def conversation(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me about {topic}, with every detail you know. " * 8}]


def chat(backend: LlamaCppBackend, messages: list[dict[str, str]]) -> tuple[str, int, int]:
    chunks: list[Chunk] = list(backend.stream(GenerationRequest(messages=messages, max_tokens=8, temperature=0.0)))
    usage = chunks[-1].usage
    assert usage is not None
    return "".join(c.text for c in chunks), usage.prompt_tokens, usage.cached_tokens


def loaded(path: str, **settings: object) -> LlamaCppBackend:
    backend = LlamaCppBackend(msgspec.structs.replace(TIER, **settings), path)
    backend.load()
    return backend


def test_a_returning_conversation_is_restored_from_ram_then_from_disk(gemma_gguf: str, tmp_path: Path) -> None:
    cache = {"prompt_cache_ram_bytes": 2**30, "prompt_cache_dir": str(tmp_path), "prompt_cache_disk_bytes": 2**30}
    backend = loaded(gemma_gguf, **cache)
    first: list[tuple[str, int]] = []
    for topic in TOPICS:  # four conversations through two slots: the first two leave theirs
        text, prompt_tokens, _ = chat(backend, conversation(topic))
        first.append((text, prompt_tokens))

    def second_turn(i: int) -> list[dict[str, str]]:
        return [
            *conversation(TOPICS[i]),
            {"role": "assistant", "content": first[i][0]},
            {"role": "user", "content": "Go on."},
        ]

    warm_ram, _, cached = chat(backend, second_turn(0))
    assert cached >= first[0][1]
    stats = backend.prompt_cache_stats()
    assert stats is not None and stats["ram"]["hits"] == 1 and stats["ram"]["entries"] >= 2
    backend.close()  # what the slots hold goes to disk too

    restarted = loaded(gemma_gguf, **cache)
    try:
        warm_disk, _, cached = chat(restarted, second_turn(1))
        assert cached >= first[1][1]
        stats = restarted.prompt_cache_stats()
        assert stats is not None and stats["disk"]["hits"] == 1 and stats["ram"]["hits"] == 0
        restarted.reset_prefix_cache()
        stats = restarted.prompt_cache_stats()
        assert stats is not None and stats["ram"]["entries"] == stats["disk"]["entries"] == 0
        assert not list(tmp_path.rglob("*.prompt"))
    finally:
        restarted.close()

    cold = loaded(gemma_gguf)  # no prompt cache
    try:
        for i, warm in ((0, warm_ram), (1, warm_disk)):
            text, _, cached = chat(cold, second_turn(i))
            assert cached < 16  # at most the template header another conversation left
            assert warm == text
    finally:
        cold.close()
