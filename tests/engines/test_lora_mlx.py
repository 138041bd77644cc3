"""LoRA adapters on the MLX engine, with mlx-lm adapter folders built at test time for the tiny model.

Each adapter is a second set of the model's modules sharing the base weights; the batch keeps one
generator per adapter, so requests with different adapters, submitted together, must each get
exactly what they get alone, and KV is reused only within one adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.base import Chunk, GenerationRequest
from backends.mlx.backend import MlxBackend
from kernel.config import TierSettings
from kernel.errors import AdapterNotFoundError, InvalidRequestError
from tests.batching import alone, together
from tests.fixtures.lora import build_mlx_lora
from tests.fixtures.tiny_mlx import build_tiny_mlx_model

PROMPT = [1, 20, 30, 40, 50, 60]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mlx_model(tmp_path_factory.mktemp("mlx-lora") / "tiny")


@pytest.fixture(scope="module")
def loras(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lora-mlx")
    return {
        "zero": build_mlx_lora(model_dir, folder / "zero", zero=True),
        "random": build_mlx_lora(model_dir, folder / "random", zero=False, seed=2),
        "other": build_mlx_lora(model_dir, folder / "other", zero=False, seed=3),
    }


@pytest.fixture(scope="module")
def mlx(model_dir: Path, loras: dict[str, Path]) -> Iterator[MlxBackend]:
    backend = MlxBackend(TierSettings(name="light", n_ctx=512, max_batch=4), str(model_dir))
    backend.load()
    for name, path in loras.items():
        assert backend.load_adapter(name, str(path)).rank == 4
    yield backend
    backend.close()


def greedy(adapter: str | None, prompt: list[int] = PROMPT, max_tokens: int = 10) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0, adapter=adapter)


def test_zero_adapter_changes_nothing_and_random_one_does(mlx: MlxBackend) -> None:
    base = alone(mlx, greedy(None))
    assert alone(mlx, greedy("zero")) == base
    changed = alone(mlx, greedy("random"))
    assert changed != base and alone(mlx, greedy("other")) not in (base, changed)
    assert alone(mlx, greedy(None)) == base  # the base modules were left untouched
    assert sorted(mlx.adapter_names()) == ["other", "random", "zero"]


def test_different_adapters_in_one_batch_each_get_their_own_output(mlx: MlxBackend) -> None:
    requests = [
        greedy(None),
        greedy("random"),
        greedy("other", [1, 7, 8, 9]),
        greedy(None, [1, 7, 8, 9]),
        greedy("zero"),
    ]
    expected = [alone(mlx, r) for r in requests]
    assert expected[2] != expected[3]
    assert together(mlx, requests) == expected


def test_prefix_is_reused_only_with_the_same_adapter(mlx: MlxBackend) -> None:
    mlx.reset_prefix_cache()
    history = list(range(1, 60))

    def cached(adapter: str | None, tail: list[int]) -> int:
        chunks: list[Chunk] = list(mlx.stream(greedy(adapter, history + tail, 2)))
        usage = chunks[-1].usage
        assert usage is not None
        return usage.cached_tokens

    assert cached("random", [70]) == 0
    assert cached(None, [70, 71]) == 0  # KV computed with the adapter is not the base model's
    assert cached("random", [70, 72]) > 50  # ... but the same adapter's is reused
    assert cached(None, [70, 71, 73]) > 50


def test_unknown_bad_and_unloaded_adapters(mlx: MlxBackend, model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFoundError) as err:
        list(mlx.stream(greedy("nope")))
    assert err.value.code == "adapter_not_found" and err.value.status == 404
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "adapter_config.json").write_text("{not json")
    (tmp_path / "junk" / "adapters.safetensors").write_bytes(b"\x00" * 8)
    for path in (model_dir, tmp_path / "junk", tmp_path / "missing"):
        with pytest.raises(InvalidRequestError):
            mlx.load_adapter("bad", str(path))
    assert "bad" not in mlx.adapter_names()
    base = alone(mlx, greedy(None))
    mlx.unload_adapter("other")
    assert "other" not in mlx.adapter_names()
    with pytest.raises(AdapterNotFoundError):
        list(mlx.stream(greedy("other")))
    assert alone(mlx, greedy(None)) == base
