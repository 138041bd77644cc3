"""Typed reads of a tier's free-form extra settings (`EMBEDDING_BATCH_SIZE=64` → extras["batch_size"]).

A bad value fails the load with one line naming the variable, like the core settings do."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.errors import ModelUnavailableError

if TYPE_CHECKING:
    from service.settings import TierSettings


def _variable(tier: TierSettings, key: str) -> str:
    return f"{(tier.name or 'tier').upper()}_{key.upper()}"


def extra_str(tier: TierSettings, key: str, default: str, choices: tuple[str, ...] | None = None) -> str:
    value = tier.extras.get(key, "").strip().lower() or default
    if choices is not None and value not in choices:
        raise ModelUnavailableError(
            f"Invalid setting {_variable(tier, key)}={value!r}: expected one of: {', '.join(choices)}"
        )
    return value


def extra_int(tier: TierSettings, key: str, default: int, minimum: int = 1) -> int:
    raw = tier.extras.get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ModelUnavailableError(f"Invalid setting {_variable(tier, key)}={raw!r}: expected an integer >= {minimum}")
    return value


def extra_bool(tier: TierSettings, key: str, default: bool) -> bool:
    raw = tier.extras.get(key, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ModelUnavailableError(f"Invalid setting {_variable(tier, key)}={raw!r}: expected true or false")


def extra_floats(tier: TierSettings, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
    """Comma-separated non-negative weights, e.g. RERANKER_HYBRID_WEIGHTS=0.4,0.2,0.4."""
    raw = tier.extras.get(key, "").strip()
    if not raw:
        return default
    try:
        values = tuple(float(part) for part in raw.split(","))
    except ValueError:
        values = ()
    if len(values) != len(default) or any(v < 0 for v in values) or sum(values) <= 0:
        raise ModelUnavailableError(
            f"Invalid setting {_variable(tier, key)}={raw!r}: expected {len(default)} comma-separated "
            "non-negative numbers, not all zero"
        )
    return values


def torch_device(tier: TierSettings) -> str:
    """<TIER>_DEVICE: cpu (default), cuda, cuda:1, mps."""
    return extra_str(tier, "device", "cpu")


def set_torch_threads(n_threads: int) -> None:
    """Honour N_THREADS for torch engines. torch's pool is process-wide: the last tier to load wins."""
    if n_threads > 0:
        import torch

        torch.set_num_threads(n_threads)
