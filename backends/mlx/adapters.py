"""LoRA adapters for the MLX engine: mlx-lm adapter folders, each on its own copy of the modules.

An adapter is loaded onto a second instance of the model's modules that shares the base weights,
so only the LoRA matrices are new memory. A request naming it runs on those modules, and the KV
they compute goes to the adapter's own prefix cache (an adapter changes every K and V). Requests
of one adapter decode together (`batch`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import load_model

from backends.base import AdapterInfo
from backends.mlx.prefix_cache import PrefixCache
from kernel.errors import InvalidRequestError


@dataclass(slots=True)
class _Loaded:
    model: Any  # the model's modules with LoRA layers, sharing the base weights
    prefix_cache: PrefixCache
    info: AdapterInfo


class LoraAdapters:
    """The adapters loaded for one model, by name, each with its prefix cache."""

    def __init__(self, prefix_cache_entries: int) -> None:
        self._prefix_cache_entries = prefix_cache_entries
        self._loaded: dict[str, _Loaded] = {}

    def names(self) -> list[str]:
        return list(self._loaded)

    def get(self, name: str) -> tuple[Any, PrefixCache] | None:
        """The adapter's modules and prefix cache; None when it is not loaded."""
        found = self._loaded.get(name)
        return None if found is None else (found.model, found.prefix_cache)

    def load(self, base: Any, model_folder: Path, name: str, path: str) -> AdapterInfo:
        """An mlx-lm adapter folder (adapter_config.json + adapters.safetensors) on a copy of the
        modules of `base`, the model loaded from `model_folder`."""
        folder = Path(path)
        config_file, weights_file = folder / "adapter_config.json", folder / "adapters.safetensors"
        if not (config_file.is_file() and weights_file.is_file()):
            raise InvalidRequestError(
                f"{path} is not an MLX adapter folder (adapter_config.json and adapters.safetensors)", param="adapter"
            )
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"{config_file}: not readable JSON ({exc})", param="adapter") from exc
        kind = config.get("fine_tune_type", "lora") if isinstance(config, dict) else None
        if kind not in ("lora", "dora"):
            raise InvalidRequestError(f"{path}: fine_tune_type {kind!r} is not a LoRA adapter", param="adapter")
        try:
            model, _ = load_model(model_folder, lazy=True)  # lazy: its own weights are never read
            model.update(base.parameters())  # the base model's arrays, shared
            load_adapters(model, str(folder))
            model.eval()
            mx.eval(model.parameters())
        except Exception as exc:
            # Shapes that do not fit this model, missing tensors, bad files: all "not for this model".
            raise InvalidRequestError(f"{path}: cannot be applied to this model: {exc}", param="adapter") from exc
        lora = config.get("lora_parameters")
        rank = lora.get("rank") if isinstance(lora, dict) else None
        info = AdapterInfo(
            name,
            str(folder),
            config_file.stat().st_size + weights_file.stat().st_size,
            rank if isinstance(rank, int) else None,
        )
        self._loaded[name] = _Loaded(model, PrefixCache(self._prefix_cache_entries), info)
        return info

    def unload(self, name: str) -> None:
        self._loaded.pop(name, None)

    def reset_prefix_caches(self) -> None:
        for adapter in self._loaded.values():
            adapter.prefix_cache.clear()

    def clear(self) -> None:
        self._loaded.clear()
