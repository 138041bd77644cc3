"""Pick and build a generation engine for a tier. Engine modules are imported only when used."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kernel.engines import EngineTable, import_engine, missing_modules
from kernel.errors import ModelUnavailableError

if TYPE_CHECKING:
    from backends.base import Backend
    from backends.remote import RemotePool
    from kernel.config import TierSettings

_ENGINES: EngineTable = {
    "llamacpp": ("backends.llamacpp.backend", "LlamaCppBackend", ("llama_cpp",), "llamacpp"),
    "mlx": ("backends.mlx.backend", "MlxBackend", ("mlx_lm",), "mlx"),
}


def engine_available(name: str) -> bool:
    return not missing_modules(_ENGINES[name][2])


def choose_engine(tier: TierSettings, model_path: str) -> str:
    """`auto`: llama.cpp for GGUF files, MLX for model folders and repo ids when MLX is importable."""
    if tier.backend != "auto":
        return tier.backend
    if model_path.lower().endswith(".gguf") or Path(model_path).is_file():
        return "llamacpp"
    if engine_available("mlx"):
        return "mlx"
    raise ModelUnavailableError(
        f"Tier {tier.name}: {model_path} is not a .gguf file and MLX is not installed "
        "(pip install 'llmservice[mlx]'), so BACKEND=auto cannot serve it"
    )


def create_backend(tier: TierSettings, model_path: str) -> Backend:
    engine = choose_engine(tier, model_path)
    if not engine_available(engine):
        raise ModelUnavailableError(
            f"Tier {tier.name} asks for the {engine} engine, which is not installed: "
            f"pip install 'llmservice[{_ENGINES[engine][3]}]'"
        )
    backend: Backend = import_engine(tier, _ENGINES, engine, "generation")(tier, model_path)
    return backend


def create_remote(tier: TierSettings) -> RemotePool:
    """`BACKEND=remote`: the tier's pool of OpenAI-compatible upstreams (imports httpx only when used)."""
    from backends.remote import RemotePool

    return RemotePool(tier)
