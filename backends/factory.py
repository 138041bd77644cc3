"""Pick and build a generation engine for a tier. Engine modules are imported only when used."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import ModelUnavailableError
from service.plugins import engine_class, missing_modules

if TYPE_CHECKING:
    from backends.base import Backend
    from service.settings import TierSettings

# name -> (module, class, the module it needs, pip extra)
_ENGINES: dict[str, tuple[str, str, str, str]] = {
    "llamacpp": ("backends.llamacpp", "LlamaCppBackend", "llama_cpp", "llamacpp"),
    "mlx": ("backends.mlx", "MlxBackend", "mlx_lm", "mlx"),
}


def engine_available(name: str) -> bool:
    return not missing_modules((_ENGINES[name][2],))


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
    module_name, class_name, _, extra = _ENGINES[engine]
    if not engine_available(engine):
        raise ModelUnavailableError(
            f"Tier {tier.name} asks for the {engine} engine, which is not installed: pip install 'llmservice[{extra}]'"
        )
    cls = engine_class(module_name, class_name)
    backend: Backend = cls(tier, model_path)
    return backend
