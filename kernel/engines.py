"""The lazy engine loader the factories (backends/, embedders/, rerankers/) share: the <TIER>_ENGINE
setting and imports by table, so an engine's library is imported only when a tier uses it and a
missing one fails the tier naming the pip extra."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

from kernel.errors import ModelUnavailableError

if TYPE_CHECKING:
    from kernel.config import TierSettings

# name -> (module, class, modules it needs, pip extra)
EngineTable = dict[str, tuple[str, str, tuple[str, ...], str]]


def missing_modules(modules: Iterable[str]) -> list[str]:
    """The modules that are not importable (found without importing them)."""
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


def engine_setting(tier: TierSettings, engines: Collection[str]) -> str:
    """<TIER>_ENGINE ("" when unset); "sentence-transformers" is read as "sentence_transformers"."""
    engine = tier.engine.strip().lower().replace("-", "_")
    if engine and engine not in engines:
        raise ModelUnavailableError(
            f"Invalid setting {tier.name.upper()}_ENGINE={engine!r}: expected one of: {', '.join(engines)}"
        )
    return engine


def import_engine(tier: TierSettings, engines: EngineTable, engine: str, kind: str) -> Any:
    """The class of `engines[engine]`, imported now; a missing dependency raises naming the pip extra."""
    module_name, class_name, needs, extra = engines[engine]
    missing = missing_modules(needs)
    if missing:
        raise ModelUnavailableError(
            f"Tier {tier.name} needs the {engine} {kind} engine, but {', '.join(missing)} "
            f"is not installed: pip install 'llmservice[{extra}]'"
        )
    cls = getattr(importlib.import_module(module_name), class_name)
    runtimes: tuple[str, ...] = getattr(cls, "runtimes", ("torch", "auto"))
    if tier.runtime not in runtimes:
        raise ModelUnavailableError(
            f"{tier.name.upper()}_RUNTIME={tier.runtime} is not supported by the {engine} {kind} engine"
            f" (it runs on: {', '.join(r for r in runtimes if r != 'auto')})"
        )
    return cls
