"""The memory budget models are loaded within (MEMORY_BUDGET).

Each model holds a reservation: its estimate (weights = file sizes, plus its KV at its settings)
from the moment its load is admitted, replaced by what the engine reports once loaded where it
reports one. A load is admitted only if its estimate fits beside every reservation; otherwise the
least recently used idle models are chosen to leave first (never a pinned one, never one with
work in flight or queued, never one still loading), and if even that is not enough the load is
refused with a 503 that names what holds the memory. Admission and the choice of victims happen
in one synchronous step, so concurrent loads never both count the same free bytes.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from kernel.config import TierSettings
from kernel.errors import ModelUnavailableError
from kernel.gguf import GgufHeaderError, cached_gguf_header
from service.tiers.model_paths import disk_size, resolve_draft_path

log = logging.getLogger(__name__)

# Left to the OS, the server itself and the caches beside the models when the budget is not set.
_MARGIN_FRACTION = 0.1
_MIN_MARGIN = 1 << 30
_NVIDIA_SMI = ("nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits")


def device_memory() -> int | None:
    """Physical RAM (on Apple Silicon that is the unified memory the GPU uses too). None where the
    platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget(total: int | None = None) -> int | None:
    total = device_memory() if total is None else total
    if total is None:
        return None
    return max(0, total - max(_MIN_MARGIN, int(total * _MARGIN_FRACTION)))


def budget_total(
    setting: int | None,
    uses_gpu: bool,
    gpu_memory: Callable[[], int | None],
    *,
    unified: bool | None = None,
    ram: int | None = None,
) -> int | None:
    """MEMORY_BUDGET, or by default the memory models load into, less a margin: on CUDA (a tier that
    offloads to a GPU, not on Apple Silicon) the GPUs' memory, else the RAM (the unified memory on
    Apple Silicon). A GPU that cannot be read falls back to the RAM, saying so once."""
    if setting is not None:
        return setting
    unified = _unified_memory() if unified is None else unified
    if uses_gpu and not unified:
        try:
            vram = gpu_memory()
        except Exception as exc:  # a probe of a driver: whatever it raises, the RAM is the answer
            log.warning("MEMORY_BUDGET: reading the GPU memory failed (%s); the budget is the RAM's", exc)
            vram = None
        if vram:
            budget = default_budget(vram)
            log.info("MEMORY_BUDGET: %s of GPU memory less a margin = %s", _gib(vram), _gib(budget or 0))
            return budget
        log.debug("MEMORY_BUDGET: no GPU found for the tiers that offload to one; the budget is the RAM's")
    return default_budget(ram)


def _unified_memory() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def probe_gpu_memory() -> int | None:
    """Total memory of the GPUs llama.cpp offloads to (it splits layers over all of them): ggml's
    device registry where llama-cpp-python exposes it, else `nvidia-smi`. None: no GPU found."""
    try:
        from backends.llamacpp.backend import gpu_memory_total
    except ImportError:  # llama.cpp is not installed: a CUDA machine may still say what it has
        total = None
    else:
        total = gpu_memory_total()
    return total if total is not None else nvidia_smi_memory()


def nvidia_smi_memory() -> int | None:
    """The summed `memory.total` of every GPU nvidia-smi lists; None where it is missing or fails."""
    try:
        done = subprocess.run(_NVIDIA_SMI, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("MEMORY_BUDGET: nvidia-smi gave no GPU memory (%s)", exc)
        return None
    return parse_nvidia_smi(done.stdout)


def parse_nvidia_smi(text: str) -> int | None:
    """`nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits`: one MiB count per GPU."""
    try:
        mib = [int(line.strip()) for line in text.splitlines() if line.strip()]
    except ValueError:
        return None  # "[N/A]" or an error text: unknown
    return sum(mib) * 2**20 if mib else None


class MemoryBudgetExceeded(ModelUnavailableError):
    """A load that does not fit: a 503 for this request; the model stays available to a later one."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="memory_budget_exceeded")


@dataclass
class Holding:
    """One model's reservation and what the budget needs to know to choose it as a victim."""

    name: str
    last_used: float
    pinned: bool = False
    busy: bool = False  # work in flight or queued
    loading: bool = False


@dataclass(frozen=True)
class Admission:
    victims: tuple[str, ...]  # to unload, in this order, before the load starts


class MemoryBudget:
    def __init__(self, total: int | None) -> None:
        self.total = total  # None: unlimited (the device's memory is unknown)
        self._held: dict[str, int] = {}

    @property
    def used(self) -> int:
        return sum(self._held.values())

    def holdings(self) -> dict[str, int]:
        return dict(self._held)

    def admit(self, name: str, estimate: int, holdings: Iterable[Holding]) -> Admission:
        """Reserve `estimate` bytes for `name`, choosing LRU idle victims whose reservations are
        released now (their engines must be unloaded before `name` loads). Raises a 503 if the
        load cannot fit even with every idle, unpinned model gone."""
        if name in self._held:
            return Admission(())
        if self.total is None:
            self._held[name] = estimate
            return Admission(())
        free = self.total - self.used
        victims: list[Holding] = []
        if estimate > free:
            candidates = sorted(
                # One holding nothing (a reranker on `tier:embedding`) frees nothing by leaving.
                (h for h in holdings if self._held.get(h.name) and not (h.pinned or h.busy or h.loading)),
                key=lambda h: h.last_used,
            )
            for h in candidates:
                if estimate <= free:
                    break
                victims.append(h)
                free += self._held[h.name]
            if estimate > free:
                raise MemoryBudgetExceeded(self._refusal(name, estimate, list(holdings)))
        for v in victims:
            del self._held[v.name]
        self._held[name] = estimate
        return Admission(tuple(v.name for v in victims))

    def settle(self, name: str, actual: int) -> None:
        """Replace a loaded model's estimate with what its engine reports."""
        if name in self._held:
            self._held[name] = actual

    def view(self) -> dict[str, Any]:
        """/health's `memory`: the budget (null: unlimited), what is held and by which model."""
        return {"budget_bytes": self.total, "used_bytes": self.used, "models": self.holdings()}

    def release(self, name: str) -> None:
        self._held.pop(name, None)

    def rename(self, old: str, new: str) -> None:
        """`new` now holds what `old` reserved (a replacement swapped in); `new`'s own reservation goes."""
        if old in self._held:
            self._held[new] = self._held.pop(old)

    def _refusal(self, name: str, estimate: int, holdings: list[Holding]) -> str:
        if self.total is not None and estimate > self.total:
            return f"Model {name} needs {_gib(estimate)}, more than the whole MEMORY_BUDGET of {_gib(self.total)}"
        state = {h.name: h for h in holdings}

        def why(held: str) -> str:
            h = state.get(held)
            reason = (
                "pinned" if h and h.pinned else "loading" if h and h.loading else "busy" if h and h.busy else "in use"
            )
            return f"{held} {_gib(self._held[held])} ({reason})"

        holders = ", ".join(why(n) for n in sorted(self._held, key=self._held.__getitem__, reverse=True))
        return (
            f"Model {name} needs {_gib(estimate)} but the memory budget of {_gib(self.total or 0)} is held by:"
            f" {holders or 'nothing'}; retry when one is idle, or raise MEMORY_BUDGET"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


# llama.cpp KV element sizes (ggml block sizes: q8_0 is 34 bytes per 32 values, q4_0 18).
_KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def estimate_bytes(tier: TierSettings, path: str) -> int | None:
    """What loading `path` with `tier`'s settings will hold: its files, plus for a GGUF its KV cache
    at the tier's context (from the header's hyperparameters). None: nothing local to measure."""
    weights = disk_size(path)
    if weights is None:
        return None
    held = weights + (gguf_kv_bytes(tier, path) if path.lower().endswith(".gguf") else 0)
    if tier.speculative == "draft" and tier.draft_model_path:  # a second model and its KV
        try:
            draft = resolve_draft_path(tier).draft_model_path or ""
        except ModelUnavailableError:
            return held  # the load reports it
        held += estimate_bytes(msgspec.structs.replace(tier, speculative="off"), draft) or 0
    return held


def gguf_kv_bytes(tier: TierSettings, path: str) -> int:
    """An upper bound of the KV cache llama.cpp allocates for this tier (every layer full-size;
    sliding-window layers hold less), the same bound `backends.llamacpp.kv_layout` sizes with."""
    try:
        kv = cached_gguf_header(path).meta
    except (OSError, GgufHeaderError):
        return 0
    arch = str(kv.get("general.architecture", ""))

    def num(key: str) -> int:
        value = kv.get(f"{arch}.{key}")
        return value if isinstance(value, int) else 0

    layers, heads = num("block_count"), max(1, num("attention.head_count"))
    head = num("embedding_length") // heads
    k, v = num("attention.key_length") or head, num("attention.value_length") or head
    kv_heads = num("attention.head_count_kv") or heads
    tokens = tier.kv_tokens or tier.n_ctx * tier.max_batch  # 0: one full context per sequence
    per_token = layers * kv_heads * (k * _KV_BYTES[tier.kv_type_k] + v * _KV_BYTES[tier.kv_type_v])
    return int(per_token * tokens)
