"""The MLX engine's prompt cache tiers on the tiny MLX model built at test time: a fifth
conversation pushes the first out of the prefix cache into the RAM tier, and it comes back from
there, then after a restart from disk, each time answering as a cold run does; corrupt files are
ignored, the budgets hold, clearing empties both tiers; the state codec keeps bfloat16 exact and
skips a sliding-window cache past its window."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from backends.base import Chunk, GenerationRequest
from backends.mlx.backend import MlxBackend
from backends.mlx.cache_state import MlxStateCodec, restore, snapshot
from kernel.config import TierSettings
from tests.fixtures.tiny_mlx import build_tiny_mlx_model

TOPICS = ["the weather in Paris", "growing tomatoes", "the history of Rome", "how a bicycle works", "cats"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mlx_model(tmp_path_factory.mktemp("mlx") / "tiny-llama")


def loaded(model_dir: Path, **settings: Any) -> MlxBackend:
    tier = TierSettings(**{"name": "light", "n_ctx": 2048, "prefix_cache_entries": 4, **settings})
    backend = MlxBackend(tier, str(model_dir))
    backend.load()
    return backend


def tiers(folder: Path, ram: int = 2**30, disk: int = 2**30) -> dict[str, Any]:
    return {"prompt_cache_ram_bytes": ram, "prompt_cache_dir": str(folder), "prompt_cache_disk_bytes": disk}


def conversation(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me about {topic}, with every detail you know. " * 4}]


def chat(backend: MlxBackend, messages: list[dict[str, str]]) -> tuple[str, int, int]:
    chunks: list[Chunk] = list(backend.stream(GenerationRequest(messages=messages, max_tokens=8, temperature=0.0)))
    usage = chunks[-1].usage
    assert usage is not None
    return "".join(c.text for c in chunks), usage.prompt_tokens, usage.cached_tokens


def stats(backend: MlxBackend) -> dict[str, Any]:
    found = backend.prompt_cache_stats()
    assert found is not None
    return found


def five_conversations(backend: MlxBackend) -> list[list[dict[str, str]]]:
    """Each topic once (the fifth evicts the first from the prefix cache); their second turns."""
    turns = []
    for topic in TOPICS:
        text, _, _ = chat(backend, conversation(topic))
        reply = [{"role": "assistant", "content": text}, {"role": "user", "content": "More."}]
        turns.append([*conversation(topic), *reply])
    return turns


def evicted(backend: MlxBackend) -> int:
    """The one conversation the RAM tier holds (the prefix cache's least recently used one: each
    new conversation's fetch refreshes the entry it shares the template header with)."""
    assert backend.prefix_cache.tiers is not None and stats(backend)["ram"]["entries"] == 1
    prompts = [backend.encode(backend.render_chat(conversation(t))) for t in TOPICS]
    [found] = [i for i, p in enumerate(prompts) if backend.prefix_cache.tiers.longest(p, len(p))[1] == len(p)]
    return found


def test_a_returning_conversation_is_restored_from_ram_then_from_disk(model_dir: Path, tmp_path: Path) -> None:
    backend = loaded(model_dir, **tiers(tmp_path))
    second = five_conversations(backend)
    i = evicted(backend)  # by the fifth
    j = (i + 1) % len(TOPICS)  # still in the prefix cache; on disk after the restart
    warm_ram, prompt_tokens, cached = chat(backend, second[i])
    assert prompt_tokens > cached >= len(backend.encode(backend.render_chat(conversation(TOPICS[i]))))
    found = stats(backend)
    assert found["ram"]["hits"] == 1 and found["disk"]["hits"] == 0
    backend.close()  # the prefix cache's entries go to disk too

    restarted = loaded(model_dir, **tiers(tmp_path))
    try:
        assert stats(restarted)["disk"]["entries"] >= len(TOPICS)  # the index rebuilt from the files
        warm_disk, _, cached = chat(restarted, second[j])
        assert cached > 0
        found = stats(restarted)
        assert found["disk"]["hits"] == 1 and found["ram"]["hits"] == 0
        restarted.reset_prefix_cache()
        found = stats(restarted)
        assert found["ram"]["entries"] == found["disk"]["entries"] == 0
        assert not list(tmp_path.rglob("*.prompt"))
    finally:
        restarted.close()

    cold = loaded(model_dir)  # no tiers
    try:
        assert cold.prompt_cache_stats() is None
        for turns, warm in ((second[i], warm_ram), (second[j], warm_disk)):
            text, _, cached = chat(cold, turns)
            assert cached < 16  # at most the template header the other turn left
            assert warm == text
    finally:
        cold.close()


def test_corrupt_truncated_and_foreign_files_are_ignored(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = loaded(model_dir, **tiers(tmp_path, ram=0))  # disk only: every hit is read from a file
    second = five_conversations(backend)
    backend.close()
    files = sorted((tmp_path / "light").glob("*.prompt"), key=lambda p: p.stat().st_size)
    assert len(files) >= 2
    for path in files:  # flip a byte inside the payload of every file: checksums fail at the hit
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    files[0].write_bytes(files[0].read_bytes()[:-100])  # truncated: refused when the index is built
    (tmp_path / "light" / "stray.prompt").write_bytes(b"not a prompt cache file")
    with caplog.at_level(logging.WARNING, logger="backends.prompt_cache"):
        restarted = loaded(model_dir, **tiers(tmp_path, ram=0))
        try:
            _, _, cached = chat(restarted, second[0])  # every file of it is corrupt
            assert cached == 0 and stats(restarted)["disk"]["hits"] == 0
        finally:
            restarted.close()
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "stray.prompt" in warnings and files[0].name in warnings and "checksum mismatch" in warnings


def test_both_budgets_are_respected(model_dir: Path, tmp_path: Path) -> None:
    probe = loaded(model_dir, prefix_cache_entries=0, **tiers(tmp_path / "probe"))
    chat(probe, conversation(TOPICS[0]))
    one = stats(probe)["ram"]["bytes"]  # one conversation's state
    probe.close()
    assert one > 0
    budget = int(2.5 * one)  # room for two
    backend = loaded(model_dir, prefix_cache_entries=0, **tiers(tmp_path / "small", ram=budget, disk=budget))
    try:
        for topic in TOPICS:
            chat(backend, conversation(topic))
        assert backend.prefix_cache.tiers is not None
        backend.prefix_cache.tiers.flush()
        found = stats(backend)
        assert 0 < found["ram"]["bytes"] <= budget and found["ram"]["evictions"] >= 2
        assert 0 < found["disk"]["bytes"] <= budget and found["disk"]["evictions"] >= 2
        on_disk = sum(p.stat().st_size for p in (tmp_path / "small").rglob("*.prompt"))
        assert on_disk == found["disk"]["bytes"]
    finally:
        backend.close()


def test_the_codec_keeps_bfloat16_exact_and_a_sliding_window_and_skips_a_wrapped_one() -> None:
    layer = KVCache()
    keys = mx.random.normal((1, 2, 5, 4)).astype(mx.bfloat16)
    layer.update_and_fetch(keys, keys * 2)
    state = snapshot([layer])
    assert state is not None
    codec = MlxStateCodec()
    back = restore(codec.load(codec.dump(state)))
    assert back[0].offset == 5 and back[0].keys.dtype == mx.bfloat16
    assert mx.array_equal(back[0].keys, keys).item() and mx.array_equal(back[0].values, keys * 2).item()
    assert state.nbytes == 2 * keys.nbytes  # cut to the 5 tokens held, not the 256 allocated

    window = RotatingKVCache(max_size=8)  # Gemma 3's sliding layers, within the window
    for i in range(5):
        window.update_and_fetch(keys[..., i : i + 1, :], keys[..., i : i + 1, :])
    state = snapshot([window])
    assert state is not None
    [back] = restore(codec.load(codec.dump(state)))
    assert (back.offset, back.max_size, back.is_trimmable()) == (5, 8, True)
    assert mx.array_equal(back.state[0][..., :5, :], keys).item()

    for i in range(4):  # past its window: it cannot be trimmed back to a prefix
        window.update_and_fetch(keys[..., i : i + 1, :], keys[..., i : i + 1, :])
    assert snapshot([window]) is None
