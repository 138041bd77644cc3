"""Which tier a request's `model` names: pure functions of the name and the tiers' slots."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence

from kernel.config import TierSettings
from kernel.errors import ModelNotFoundError
from service.settings import GENERATION_TIERS
from service.tiers.model_paths import model_file_name
from service.tiers.slots import TierSlot, TierState

_QUANT_SUFFIX = re.compile(r"([-_.](i?q\d\w*|f16|f32|bf16|fp16|\d+bit)|\.gguf|-gguf)$", re.IGNORECASE)
_SIZE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)([bm])(?![a-z])", re.IGNORECASE)


def model_name(tier: TierSettings) -> str:
    """A readable model name from the setting: `gemma-3-270m-q4_k_m.gguf` → `gemma-3-270m`."""
    if tier.model_name:
        return tier.model_name
    if tier.backend == "remote":
        return tier.remote_model or "remote"
    name = model_file_name(tier.model_path or "").lower()
    while (stripped := _QUANT_SUFFIX.sub("", name)) != name:
        name = stripped
    return name


def configured(slots: Mapping[str, TierSlot]) -> list[TierSlot]:
    return [s for s in slots.values() if s.state is not TierState.ABSENT]


def resolve(model: str, slots: Mapping[str, TierSlot], aliases: Sequence[tuple[str, str]] = ()) -> TierSlot:
    """Tier name, `tier/name`, the model's own name, then MODEL_ALIASES in order, then the seed's
    name patterns."""
    key = model.strip().lower()
    if (named := exact(key, slots)) is not None:
        return named
    if aliased := next((slots[tier] for pattern, tier in aliases if fnmatch.fnmatchcase(key, pattern)), None):
        return aliased
    if routed := _by_pattern(key, slots):
        return routed
    available = ", ".join(s.id for s in configured(slots)) or "none"
    also = f"; aliases: {', '.join(f'{p}={t}' for p, t in aliases)}" if aliases else ""
    raise ModelNotFoundError(f"Model not found: {shown(model)}. Available models: {available}{also}")


def exact(key: str, slots: Mapping[str, TierSlot]) -> TierSlot | None:
    """The tier `key` (lower case) names exactly: tier, `tier/...`, model name or id; never by pattern."""
    tier, _, rest = key.partition("/")
    if key in slots or (rest and tier in slots):
        return slots[key if key in slots else tier]
    return next((s for s in configured(slots) if key in (s.model.lower(), s.id.lower())), None)


def _by_pattern(key: str, slots: Mapping[str, TierSlot]) -> TierSlot | None:
    if any(fnmatch.fnmatch(key, p) for p in ("*rerank*", "*cross-encoder*")):
        return slots["reranker"]
    if any(fnmatch.fnmatch(key, p) for p in ("*embed*", "*bge*", "*e5*")):
        return slots["embedding"]
    if size := _SIZE.search(key):
        wanted = size.group(0).lower()
        for slot in configured(slots):
            if slot.name in GENERATION_TIERS and (m := _SIZE.search(slot.model)) and m.group(0).lower() == wanted:
                return slot
    return None


def shown(model: str) -> str:
    """A client's model name as echoed in errors: at most 100 characters."""
    return model if len(model) <= 100 else model[:100] + "…"
