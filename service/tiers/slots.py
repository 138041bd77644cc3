"""A tier's state: its slot (settings, loaded engine, executor, counters) and the one view of it
that `/health`, `/v1/models`, `/v1/stats` and `/metrics` all present."""

from __future__ import annotations

import asyncio
import enum
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kernel.config import Sampling, SamplingSource, TierSettings
from service.tiers.executor import Executor

if TYPE_CHECKING:
    from backends.base import Backend
    from backends.reasoning import ReasoningFormat
    from backends.remote import RemotePool
    from backends.tools import ToolFormat
    from embedders.base import Embedder
    from rerankers.base import Reranker
    from service.tiers.micro_batcher import MicroBatcher
    from service.tiers.workers import GenerationWorker


class TierState(enum.StrEnum):
    ABSENT = "absent"  # no MODEL_PATH
    AVAILABLE = "available"  # configured, not loaded
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


@dataclass(eq=False)
class AdapterRecord:
    """A LoRA adapter of a generation tier: from <TIER>_ADAPTERS or loaded by an admin at runtime.
    It is loaded into the engine with the model (and again after every reload)."""

    name: str
    path: str
    source: str  # "settings" or "runtime"
    status: str = "available"  # available (loads with the model), loaded, failed
    error: str | None = None
    rank: int | None = None
    size_bytes: int | None = None
    requests: int = 0  # generations that used it (cache hits excluded)
    fingerprint: str = ""  # path, size and mtime when loaded: part of the response-cache key

    def loaded(self, rank: int | None, size: int) -> None:
        self.status, self.error, self.rank, self.size_bytes = "loaded", None, rank, size
        try:
            self.fingerprint = f"{self.path}:{size}:{os.stat(self.path).st_mtime_ns}"
        except OSError:
            self.fingerprint = f"{self.path}:{size}"


@dataclass(frozen=True)
class TierView:
    """A tier as every status endpoint shows it, taken at one moment."""

    tier: str
    model: str  # tier/name
    state: str
    engine: str | None
    device: str | None
    context_length: int | None
    dimension: int | None
    error: str | None
    loaded_at: float | None  # only while loaded
    last_used: float | None
    requests: int
    overflowed: int  # requests passed on to the OVERFLOW tier because the queue was full
    in_flight: int
    queued: int
    busy: bool
    processed: int
    load_seconds: float | None
    memory_bytes: int  # on disk, while loaded
    kv_bytes: int | None  # llama.cpp: the KV cache (and recurrent state) the loaded model holds
    worker: dict[str, Any] | None


@dataclass(eq=False)
class TierSlot:
    name: str
    settings: TierSettings
    state: TierState
    model: str = ""
    error: str | None = None
    family: str = ""  # a catalogue model's slot: the tier whose family it belongs to ("" = its own name)
    # What a load sets (moved from a staging slot to the live one by `Registry.replace`). The
    # engine's type is the tier's family's (service.tiers.families): generation tiers hold a Backend
    # run by a GenerationWorker, embedding and reranker tiers an Embedder or Reranker run by a
    # MicroBatcher.
    engine: Backend | Embedder | Reranker | RemotePool | None = None
    worker: GenerationWorker | RemotePool | None = None  # a remote tier's pool is its own executor
    batcher: MicroBatcher[Any, Any] | None = None  # items and results are the family's
    engine_name: str | None = None
    tool_format: ToolFormat | None = None  # generation tiers: how the model writes tool calls
    reasoning: ReasoningFormat | None = None  # generation tiers: how it marks its thinking
    device: str | None = None
    context_length: int | None = None
    kv_bytes: int | None = None  # generation tiers on llama.cpp: what the engine allocated for KV
    dimension: int | None = None  # embedding tiers
    capabilities: frozenset[str] = frozenset()  # embedding tiers: dense, sparse, colbert
    load_seconds: float | None = None
    loaded_at: float | None = None
    path: str | None = None  # MODEL_PATH resolved to a file or folder, once loaded
    size_bytes: int | None = None  # on disk
    estimate_bytes: int | None = None  # what the memory budget reserved for the load
    # (MODEL_PATH, what it resolved to) for the coming load: its card, estimate and load share one
    # resolution (a `package:` spec locates or assembles files); forgotten when the load ends.
    resolved: tuple[str, str] | None = None
    # Kept across loads.
    # Generation tiers: the model card's sampling defaults (`EngineInfo.sampling`); None until a load read them.
    card: dict[str, float] | None = None
    last_used: float | None = None
    requests: int = 0
    overflowed: int = 0
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)  # generation tiers: LoRA adapters
    load_task: asyncio.Task[None] | None = field(default=None, repr=False)
    draining: asyncio.Task[None] | None = field(default=None, repr=False)  # an unload finishing its requests

    LOADED_FIELDS = (
        "engine", "worker", "batcher", "engine_name", "tool_format", "reasoning", "device", "context_length",
        "kv_bytes", "dimension", "capabilities", "load_seconds", "loaded_at", "path", "size_bytes", "state",
    )  # fmt: skip

    @property
    def family_key(self) -> str:
        """The key of `service.tiers.families.FAMILIES` that says what this slot's engine is."""
        return self.family or self.name

    @property
    def id(self) -> str:
        return self.model if self.family else f"{self.name}/{self.model}"  # a catalogue model: its own name

    @property
    def remote(self) -> bool:
        """Served by a pool of upstream servers (`BACKEND=remote`): no model, tokenizer or thread of ours."""
        return self.settings.backend == "remote"

    @property
    def executor(self) -> Executor | None:
        return self.worker if self.worker is not None else self.batcher

    @property
    def in_flight(self) -> int:
        """Requests (generation) or inputs (embedding, rerank) that hold the model: waiting or
        running (a stream holds it until it ends)."""
        return self.executor.in_flight if self.executor else 0

    @property
    def interactive_waiting(self) -> int:
        """Interactive work queued for the model (not yet running): batch lines hold back meanwhile."""
        return self.executor.interactive_waiting if self.executor else 0

    def sampling(self) -> tuple[Sampling, dict[str, SamplingSource]]:
        """The sampling values of a request that sets none, and where each comes from (`Sampling.resolve`)."""
        return Sampling.resolve(self.settings, self.card or {})

    def sampling_text(self) -> str:
        """`temperature=0.6 (model card), top_p=0.95 (built-in), ...`: the load log's account of them."""
        values, sources = self.sampling()
        return ", ".join(f"{name}={getattr(values, name):g} ({source})" for name, source in sources.items())

    def cache_identity(self) -> tuple[Any, ...]:
        """Everything about the tier's model that decides its outputs: part of every cache key."""
        t = self.settings
        identity = (self.id, t.model_path, t.backend, t.chat_template, t.n_ctx, t.embedding_dimension)
        # A remote tier's model is whatever its upstreams serve: another pool or model, other answers.
        return (*identity, t.remote_model, t.upstreams) if self.remote else identity

    def view(self) -> TierView:
        executor = self.executor
        loaded = self.state is TierState.LOADED
        return TierView(
            tier=self.name,
            model=self.id,
            state=self.state.value,
            engine=self.engine_name,
            device=self.device,
            context_length=self.context_length or self.settings.n_ctx,
            dimension=self.dimension or self.settings.embedding_dimension,
            error=self.error,
            loaded_at=self.loaded_at if loaded else None,
            last_used=self.last_used,
            requests=self.requests,
            overflowed=self.overflowed,
            in_flight=executor.in_flight if executor else 0,
            queued=executor.waiting if executor else 0,
            busy=bool(executor and executor.busy),
            processed=executor.processed if executor else 0,
            load_seconds=self.load_seconds,
            memory_bytes=(self.size_bytes or 0) if loaded else 0,
            kv_bytes=self.kv_bytes if loaded else None,
            worker=executor.view() if executor else None,
        )
