"""The registry: tiers → loaded engines, their workers and lifecycle. Controllers only talk to this."""

from __future__ import annotations

import asyncio
import enum
import fnmatch
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from backends.base import Backend, GenerationRequest
from backends.factory import create_backend
from backends.reasoning import ReasoningFormat
from backends.tools import ToolFormat
from embedders.base import Embedder, EmbeddingBatch, EmbeddingJob, EmbeddingRequest
from embedders.factory import create_embedder
from kernel.config import MAX_ADAPTERS, TierSettings
from kernel.errors import (
    AdapterNotFoundError,
    InvalidRequestError,
    LLMServiceError,
    ModelLoadingError,
    ModelNotFoundError,
    ModelUnavailableError,
    TierNotConfiguredError,
)
from rerankers.base import Reranker, RerankResult
from rerankers.factory import create_reranker
from service.batching import MicroBatcher
from service.model_paths import disk_size, model_file_name, resolve_model_path
from service.settings import GENERATION_TIERS, TIERS, Settings
from service.workers import GenerationWorker, JobStream

log = logging.getLogger(__name__)

T = TypeVar("T")


class TierState(enum.StrEnum):
    ABSENT = "absent"  # no MODEL_PATH
    AVAILABLE = "available"  # configured, not loaded
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


_QUANT_SUFFIX = re.compile(r"([-_.](i?q\d\w*|f16|f32|bf16|fp16|\d+bit)|\.gguf|-gguf)$", re.IGNORECASE)
_SIZE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)([bm])(?![a-z])", re.IGNORECASE)


def model_name(tier: TierSettings) -> str:
    """A readable model name from the setting: `gemma-3-270m-q4_k_m.gguf` → `gemma-3-270m`."""
    if tier.model_name:
        return tier.model_name
    name = model_file_name(tier.model_path or "").lower()
    while (stripped := _QUANT_SUFFIX.sub("", name)) != name:
        name = stripped
    return name


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


@dataclass(eq=False)
class TierSlot:
    name: str
    settings: TierSettings
    state: TierState
    model: str = ""
    error: str | None = None
    engine: Any = None  # Backend, Embedder or Reranker once loaded
    worker: GenerationWorker | None = None  # generation tiers
    batcher: MicroBatcher[Any, Any] | None = None  # embedding and reranker tiers
    engine_name: str | None = None
    tool_format: ToolFormat | None = None  # generation tiers: how the model writes tool calls
    reasoning: ReasoningFormat | None = None  # generation tiers: how it marks its thinking
    device: str | None = None
    context_length: int | None = None
    dimension: int | None = None  # embedding tiers
    capabilities: frozenset[str] = frozenset()  # embedding tiers: dense, sparse, colbert
    load_seconds: float | None = None
    loaded_at: float | None = None
    last_used: float | None = None
    requests: int = 0
    path: str | None = None  # MODEL_PATH resolved to a file or folder, once loaded
    size_bytes: int | None = None  # on disk
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)  # generation tiers: LoRA adapters
    load_task: asyncio.Task[None] | None = field(default=None, repr=False)
    draining: asyncio.Task[None] | None = field(default=None, repr=False)  # an unload finishing its requests

    @property
    def id(self) -> str:
        return f"{self.name}/{self.model}"

    @property
    def in_flight(self) -> int:
        """Requests that hold the model: queued or running (a stream holds it until it ends)."""
        if self.batcher is not None:
            return self.batcher.queued_items
        return self.worker.in_flight if self.worker else 0

    @property
    def interactive_waiting(self) -> int:
        """Interactive requests queued for the model (not yet running): batch lines hold back meanwhile."""
        if self.batcher is not None:
            return self.batcher.queued_interactive
        return self.worker.waiting_interactive if self.worker else 0

    def describe(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "model": self.id if self.state is not TierState.ABSENT else None,
            "engine": self.engine_name,
            "device": self.device,
            "context_length": self.context_length,
            "error": self.error,
            "queued": self.worker.waiting if self.worker else 0,
            "busy": bool(self.worker and self.worker.busy),
        }


class Registry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.time()
        # One model load at a time, in tier order at start-up: two libraries initialising a GPU
        # runtime at once (torch and llama.cpp's CUDA build) is what a load must never race into.
        self._loading = asyncio.Lock()
        self.slots: dict[str, TierSlot] = {}
        for name in TIERS:
            tier = settings.tier(name)
            state = TierState.AVAILABLE if tier.configured else TierState.ABSENT
            self.slots[name] = TierSlot(name, tier, state, model=model_name(tier) if tier.configured else "")
            for adapter, path in tier.adapters.items():
                self.slots[name].adapters[adapter] = AdapterRecord(adapter, os.path.expanduser(path), "settings")
        for slot in self.configured():  # `tier:embedding` shows the model it scores with
            source = (slot.settings.model_path or "").strip().removeprefix("tier:")
            if slot.settings.model_path != source and source in self.slots and not slot.settings.model_name:
                slot.model = self.slots[source].model

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        for slot in self.configured():
            if slot.settings.preload:
                self._begin_load(slot)

    async def preloaded(self) -> None:
        """Wait until every load started by `start()` has finished (loaded or failed)."""
        tasks = [s.load_task for s in self.slots.values() if s.load_task is not None]
        if tasks:
            await asyncio.wait(tasks)

    async def close(self) -> None:
        for slot in self.slots.values():
            if slot.load_task and not slot.load_task.done():
                slot.load_task.cancel()
        for slot in self.slots.values():
            if slot.batcher is not None:
                await slot.batcher.close()
                slot.batcher = None
        await asyncio.to_thread(self._close_all)

    def _close_all(self) -> None:
        for slot in self.slots.values():
            self._unload_sync(slot)

    def _unload_sync(self, slot: TierSlot) -> None:
        if slot.worker is not None:
            slot.worker.close()
            slot.worker = None
        if slot.engine is not None:
            slot.engine.close()
            slot.engine = None
        if slot.state is TierState.LOADED:
            slot.state = TierState.AVAILABLE

    async def load(self, slot: TierSlot) -> None:
        """Load now (or join a load under way); a failure leaves the slot FAILED with its reason."""
        await asyncio.shield(self._begin_load(slot))

    async def unload(self, slot: TierSlot) -> int:
        """Take the model out of service and free it once its queued and running requests (streams
        included) have finished; new requests meanwhile wait and load it again. Returns how many
        requests were in flight."""
        if slot.load_task is not None and not slot.load_task.done():
            await asyncio.shield(slot.load_task)
        if slot.state is not TierState.LOADED:
            return 0
        pending, worker, engine, batcher = slot.in_flight, slot.worker, slot.engine, slot.batcher
        slot.worker = slot.engine = slot.batcher = None
        slot.state = TierState.AVAILABLE
        for adapter in slot.adapters.values():
            if adapter.status == "loaded":
                adapter.status = "available"  # loads again with the model
        log.info("Tier %s: unloading %s (%d requests in flight finish first)", slot.name, slot.id, pending)
        await self._retire(slot, worker, engine, batcher)
        log.info("Tier %s: unloaded", slot.name)
        return pending

    async def _retire(
        self, slot: TierSlot, worker: GenerationWorker | None, engine: Any, batcher: MicroBatcher[Any, Any] | None
    ) -> None:
        """Free a model taken out of `slot` once the requests it already accepted have finished."""
        if batcher is not None:
            await batcher.close(drain=True)
        slot.draining = asyncio.create_task(asyncio.to_thread(_drain, worker, engine), name=f"drain-{slot.name}")
        await asyncio.shield(slot.draining)

    async def replace(self, slot: TierSlot, settings: TierSettings) -> str | None:
        """Serve the model `settings` names from `slot`: load it beside the current one, swap, then
        retire the old one once its requests finish. Returns the id of the model it replaced. If the
        new one fails to load, `slot` is left exactly as it was (a loaded model keeps serving)."""
        if slot.load_task is not None and not slot.load_task.done():
            await asyncio.shield(slot.load_task)
        staging = TierSlot(slot.name, settings, TierState.LOADING, model=model_name(settings))
        staging.adapters = slot.adapters  # the tier's adapters, loaded into the new model (or failing there)
        await asyncio.shield(self._load(staging))
        if staging.state is not TierState.LOADED:
            kept = f"{slot.id} keeps serving" if slot.state is TierState.LOADED else f"tier {slot.name} is unchanged"
            raise InvalidRequestError(
                f"Could not load {settings.model_path}: {staging.error}; {kept}",
                param="model_path",
                code="model_load_failed",
            )
        old_id = slot.id if slot.state is TierState.LOADED else None
        old = (slot.worker, slot.engine, slot.batcher)
        for name in _LOADED_FIELDS:
            setattr(slot, name, getattr(staging, name))
        slot.settings, slot.model, slot.error = settings, staging.model, None
        if old_id is not None:
            log.info("Tier %s: %s replaced by %s; retiring the old model", slot.name, old_id, slot.id)
            await self._retire(slot, *old)
        return old_id

    def retune(self, slot: TierSlot, settings: TierSettings) -> None:
        """New per-tier defaults for requests from now on (PATCH /v1/config); the queue bound goes
        to the loaded model's worker or batcher too, the rest is read from `slot.settings` per request."""
        slot.settings = settings
        if slot.worker is not None:
            slot.worker.max_queue = settings.max_queue
        if slot.batcher is not None:
            slot.batcher.max_queued_items = settings.max_queue * self.settings.max_batch_inputs

    def _begin_load(self, slot: TierSlot) -> asyncio.Task[None]:
        if slot.load_task is None or (slot.load_task.done() and slot.state is not TierState.LOADED):
            slot.state = TierState.LOADING
            slot.error = None
            slot.load_task = asyncio.create_task(self._load(slot), name=f"load-{slot.name}")
        return slot.load_task

    async def _load(self, slot: TierSlot) -> None:
        if slot.draining is not None:  # never two copies in memory: the old one finishes first
            await asyncio.shield(slot.draining)
        log.info("Tier %s: loading %s", slot.name, slot.settings.model_path)
        started = time.monotonic()
        progress = asyncio.create_task(_log_progress(slot.name, started))
        try:
            await self._load_dependency(slot)
            async with self._loading:
                await asyncio.to_thread(self._load_sync, slot)
        except LLMServiceError as exc:
            slot.state, slot.error = TierState.FAILED, exc.message
            log.error("Tier %s: failed to load: %s", slot.name, exc.message)
            return
        except Exception as exc:
            slot.state, slot.error = TierState.FAILED, f"{type(exc).__name__}: {exc}"
            log.exception("Tier %s: failed to load", slot.name)
            return
        finally:
            progress.cancel()
        slot.load_seconds = time.monotonic() - started
        slot.loaded_at = time.time()
        slot.state = TierState.LOADED
        log.info("Tier %s: %s loaded on %s in %.1f s", slot.name, slot.id, slot.engine_name, slot.load_seconds)

    def _load_sync(self, slot: TierSlot) -> None:
        path = resolve_model_path(slot.settings.model_path or "")
        slot.path, slot.size_bytes = path, disk_size(path)
        if slot.size_bytes is not None:
            log.info("Tier %s: reading %s (%.0f MiB)", slot.name, path, slot.size_bytes / 2**20)
        if slot.name == "embedding":
            self._load_embedder(slot, path)
            return
        if slot.name == "reranker":
            self._load_reranker(slot, path)
            return
        backend: Backend = create_backend(slot.settings, path)
        backend.load()
        for adapter in slot.adapters.values():
            _load_adapter(slot, backend, adapter)
        info = backend.info()
        slot.engine, slot.engine_name, slot.device = backend, info.engine, info.device
        slot.context_length, slot.tool_format, slot.reasoning = info.context_length, info.tool_format, info.reasoning
        slot.worker = GenerationWorker(slot.name, backend, slot.settings.max_queue)

    async def _load_dependency(self, slot: TierSlot) -> None:
        """`RERANKER_MODEL_PATH=tier:embedding` scores with that tier's model: load it first."""
        spec = (slot.settings.model_path or "").strip()
        if not spec.startswith("tier:"):
            return
        name = spec.removeprefix("tier:").strip()
        target = self.slots.get(name)
        if target is None or target is slot or target.state is TierState.ABSENT:
            raise ModelUnavailableError(
                f"{slot.name.upper()}_MODEL_PATH={spec} names no configured tier (try tier:embedding)"
            )
        await self.load(target)
        if target.state is not TierState.LOADED:
            raise ModelUnavailableError(f"Tier {slot.name} needs tier {name}, which failed: {target.error}")

    def _load_embedder(self, slot: TierSlot, path: str) -> None:
        embedder = create_embedder(slot.settings, path)
        embedder.load()
        info = embedder.info()
        slot.engine, slot.engine_name, slot.device = embedder, info.engine, info.device
        slot.context_length, slot.dimension, slot.capabilities = info.max_tokens, info.dimension, info.capabilities
        slot.batcher = self._batcher(slot, embedder.embed_jobs, _job_cost)

    def _load_reranker(self, slot: TierSlot, path: str) -> None:
        source = path.removeprefix("tier:").strip()

        def embedder() -> Embedder:  # asked on every call: the embedding tier may be reloaded
            engine = self.slots[source].engine if source in self.slots else None
            if not isinstance(engine, Embedder):
                raise ModelUnavailableError(f"Tier {slot.name} scores with tier {source}, which is not loaded")
            return engine

        reranker = create_reranker(slot.settings, path, embedder)
        reranker.load()
        info = reranker.info()
        slot.engine, slot.engine_name, slot.device = reranker, info.engine, info.device
        slot.context_length = info.max_tokens
        slot.batcher = self._batcher(slot, reranker.score_pairs, _pair_cost)

    def _batcher(
        self, slot: TierSlot, run: Callable[[list[Any]], list[Any]], cost: Callable[[Any], int]
    ) -> MicroBatcher[Any, Any]:
        tier = slot.settings
        return MicroBatcher(
            run,
            max_batch_size=tier.micro_batch_size,
            max_batch_tokens=tier.micro_batch_tokens,
            cost=cost,
            max_wait_ms=tier.micro_batch_wait_ms,
            max_queued_items=tier.max_queue * self.settings.max_batch_inputs,
            name=slot.name,
        )

    async def ensure_loaded(self, slot: TierSlot) -> TierSlot:
        if slot.state is TierState.ABSENT:
            raise TierNotConfiguredError(slot.name)
        if slot.state is TierState.LOADING and slot.load_task is not None:
            # Someone else's load (start-up or another request): wait LOAD_WAIT_SECONDS, then 503.
            try:
                await asyncio.wait_for(asyncio.shield(slot.load_task), self.settings.load_wait_seconds)
            except TimeoutError:
                raise ModelLoadingError(slot.name) from None
        elif slot.state is TierState.AVAILABLE:  # not loaded yet (lazy tier, or unloaded): this request loads it
            await asyncio.shield(self._begin_load(slot))
        if slot.state is TierState.FAILED:
            raise ModelUnavailableError(f"Tier {slot.name} failed to load: {slot.error}")
        slot.last_used = time.time()
        slot.requests += 1
        return slot

    # -- routing ---------------------------------------------------------------------------
    def configured(self) -> list[TierSlot]:
        return [s for s in self.slots.values() if s.state is not TierState.ABSENT]

    def resolve(self, model: str) -> TierSlot:
        """Tier name, `tier/name`, the model's own name, or the seed's name patterns."""
        key = model.strip().lower()
        if key in self.slots:
            return self.slots[key]
        tier, _, rest = key.partition("/")
        if rest and tier in self.slots:
            return self.slots[tier]
        for slot in self.configured():
            if key in (slot.model.lower(), slot.id.lower()):
                return slot
        if routed := self._by_pattern(key):
            return routed
        available = ", ".join(s.id for s in self.configured()) or "none"
        raise ModelNotFoundError(f"Model not found: {_shown(model)}. Available models: {available}")

    def _by_pattern(self, key: str) -> TierSlot | None:
        if any(fnmatch.fnmatch(key, p) for p in ("*rerank*", "*cross-encoder*")):
            return self.slots["reranker"]
        if any(fnmatch.fnmatch(key, p) for p in ("*embed*", "*bge*", "*e5*")):
            return self.slots["embedding"]
        if size := _SIZE.search(key):
            wanted = size.group(0).lower()
            for slot in self.configured():
                if slot.name in GENERATION_TIERS and (m := _SIZE.search(slot.model)) and m.group(0).lower() == wanted:
                    return slot
        return None

    async def generation(self, model: str) -> TierSlot:
        return await self.ensure_loaded(self.generation_slot(model))

    async def tokenize(self, slot: TierSlot, request: GenerationRequest) -> list[int]:
        """The prompt's tokens as generation would see them (chat template and tools applied).

        Tokenizers only read the vocabulary, so this runs beside generation, not queued behind it."""
        backend: Backend = (await self.ensure_loaded(slot)).engine
        return await asyncio.to_thread(backend.tokens, request)

    async def detokenize(self, slot: TierSlot, tokens: list[int]) -> str:
        backend: Backend = (await self.ensure_loaded(slot)).engine
        vocab = backend.info().vocab_size
        if vocab and any(not 0 <= t < vocab for t in tokens):
            raise InvalidRequestError(f"tokens must be ids from 0 to {vocab - 1}", param="tokens")
        return await asyncio.to_thread(backend.detokenize, tokens)

    def generation_target(self, model: str, adapter: str | None = None) -> tuple[TierSlot, str | None]:
        """The generation tier and LoRA adapter a request names: `model: "<model>:<adapter>"` (where
        `<model>` names a tier exactly) and/or the `adapter` field. 404 adapter_not_found for an
        adapter the tier does not have."""
        base, sep, named = model.strip().rpartition(":")
        exact = self._exact(base.lower()) if sep and base and named else None
        if exact is None:
            slot, param = self.generation_slot(model), "adapter"
        else:
            slot, param = self.generation_slot(base), "model"
            if adapter is not None and adapter != named:
                raise InvalidRequestError(
                    f"model names adapter {_shown(named)} but adapter is {_shown(adapter)}", param="adapter"
                )
            adapter = named
        if adapter is not None:
            self.adapter(slot, adapter, param=param)
        return slot, adapter

    def adapter(self, slot: TierSlot, name: str, *, param: str = "adapter") -> AdapterRecord:
        record = slot.adapters.get(name)
        if record is None:
            raise AdapterNotFoundError(name, f"tier {slot.name}", sorted(slot.adapters), param=param)
        return record

    async def load_adapter(self, slot: TierSlot, name: str, path: str) -> AdapterRecord:
        """Load an adapter into the tier's model now (loading the model first if need be); it is
        kept for the tier from then on, across model reloads, until unloaded."""
        if slot.name not in GENERATION_TIERS:
            raise InvalidRequestError(f"Tier {slot.name} does not generate text: no adapters", param="model")
        existing = slot.adapters.get(name)
        if existing is not None:
            if existing.path == path and existing.status == "loaded":
                return existing
            raise InvalidRequestError(
                f"Tier {slot.name} already has an adapter named {name}; unload it first",
                param="adapter",
                code="adapter_exists",
            )
        if len(slot.adapters) >= MAX_ADAPTERS:
            raise InvalidRequestError(f"Tier {slot.name} has {MAX_ADAPTERS} adapters, the most it may hold")
        await self.ensure_loaded(slot)
        record = AdapterRecord(name, path, "runtime")
        info = await self._on_model_thread(slot, lambda engine: engine.load_adapter(name, path))
        record.loaded(info.rank, info.size_bytes)
        slot.adapters.setdefault(name, record)
        log.info("Tier %s: adapter %s loaded from %s", slot.name, name, path)
        return slot.adapters[name]

    async def unload_adapter(self, slot: TierSlot, name: str) -> AdapterRecord:
        """Forget an adapter; requests already running with it finish first (the engine drops it
        between batches), later ones get 404."""
        record = self.adapter(slot, name)
        del slot.adapters[name]
        if slot.state is TierState.LOADED and slot.worker is not None:
            await self._on_model_thread(slot, lambda engine: engine.unload_adapter(name))
        record.status = "unloaded"
        log.info("Tier %s: adapter %s unloaded", slot.name, name)
        return record

    async def _on_model_thread(self, slot: TierSlot, fn: Callable[[Backend], T]) -> T:
        """`fn(engine)` on the model's worker thread, between batches; its exception is raised here."""
        worker, engine = slot.worker, slot.engine
        if worker is None or engine is None:
            raise ModelUnavailableError(f"Tier {slot.name} is not loaded")
        results: list[T] = []
        errors: list[Exception] = []

        def call() -> None:
            try:
                results.append(fn(engine))
            except Exception as exc:
                errors.append(exc)

        await worker.run(call)
        if errors:
            raise errors[0]
        if not results:
            raise ModelUnavailableError(f"Tier {slot.name} was unloaded meanwhile; try again")
        return results[0]

    def _exact(self, key: str) -> TierSlot | None:
        """A generation tier named exactly (tier, `tier/...`, model name or id), never by pattern."""
        tier, _, rest = key.partition("/")
        slot: TierSlot | None
        if key in self.slots or (rest and tier in self.slots):
            slot = self.slots[key if key in self.slots else tier]
        else:
            slot = next((s for s in self.configured() if key in (s.model.lower(), s.id.lower())), None)
        return slot if slot is not None and slot.name in GENERATION_TIERS else None

    def generation_slot(self, model: str) -> TierSlot:
        """The generation tier for `model`, without loading it (a cached answer needs no model)."""
        slot = self.resolve(model)
        if slot.state is TierState.ABSENT:
            raise TierNotConfiguredError(slot.name)
        if slot.name not in GENERATION_TIERS:
            raise ModelNotFoundError(
                f"Model {_shown(model)} is served by the {slot.name} tier, which does not generate text"
            )
        return slot

    async def generate(self, slot: TierSlot, request: GenerationRequest, *, background: bool = False) -> JobStream:
        """`background`: a batch-job line, queued after every interactive request (see workers)."""
        while slot.worker is None:  # unloaded since ensure_loaded: load it again
            await self.ensure_loaded(slot)
        return slot.worker.submit(request, background=background)

    async def tier_for(self, model: str, tier: str) -> TierSlot:
        """The loaded `tier` (embedding or reranker) that `model` names."""
        slot = self.resolve(model)
        if slot.state is TierState.ABSENT:
            raise TierNotConfiguredError(slot.name)
        if slot.name != tier:
            raise InvalidRequestError(
                f"Model {_shown(model)} is served by the {slot.name} tier; this endpoint needs the {tier} tier",
                param="model",
            )
        await self.ensure_loaded(slot)
        while slot.batcher is None:  # unloaded meanwhile
            await self.ensure_loaded(slot)
        return slot

    async def embed(self, slot: TierSlot, request: EmbeddingRequest, *, background: bool = False) -> EmbeddingBatch:
        embedder: Embedder = slot.engine
        batcher = slot.batcher
        assert batcher is not None
        needs_tokenizer = any(not isinstance(item, str) for item in request.inputs)
        # Decoding token ids takes the model's lock: keep that off the event loop.
        texts = await asyncio.to_thread(embedder.prepare, request) if needs_tokenizer else embedder.prepare(request)
        # Tokenising (for packing and so the model thread does not) takes ~20 µs for a sentence,
        # less than a thread hop: only large inputs go to a thread, where the fast tokenizer
        # runs without the GIL beside the model.
        if sum(len(t) for t in texts) > _INLINE_TOKENIZE_CHARS:
            jobs = await asyncio.to_thread(embedder.jobs, request, texts)
        else:
            jobs = embedder.jobs(request, texts)
        outputs = await batcher.submit(jobs, background=background)
        return embedder.finish(outputs, request.dimensions)

    async def rerank(
        self, slot: TierSlot, query: str, docs: list[str], top_n: int | None, normalize: bool
    ) -> tuple[list[RerankResult], int]:
        """Results best first, and the tokens they cost."""
        reranker: Reranker = slot.engine
        batcher = slot.batcher
        assert batcher is not None
        if not docs:
            return [], 0
        raw = await batcher.submit([(query, doc) for doc in docs])
        tokens = await asyncio.to_thread(reranker.count_tokens, query, docs)
        return reranker.rank(raw, top_n, normalize), tokens

    # -- views -----------------------------------------------------------------------------
    def uptime(self) -> float:
        return time.time() - self.started

    def health(self) -> dict[str, Any]:
        return {name: slot.describe() for name, slot in self.slots.items() if slot.state is not TierState.ABSENT}


_INLINE_TOKENIZE_CHARS = 2000


def _job_cost(job: EmbeddingJob) -> int:
    return job.cost


def _pair_cost(pair: tuple[str, str]) -> int:
    # About 4 characters a token, plus the special tokens of a pair; only packing uses it.
    return (len(pair[0]) + len(pair[1])) // 4 + 3


def _shown(model: str) -> str:
    """A client's model name as echoed in errors: at most 100 characters."""
    return model if len(model) <= 100 else model[:100] + "…"


# What a load sets on a slot: moved from a staging slot to the live one by `Registry.replace`.
_LOADED_FIELDS = (
    "engine", "worker", "batcher", "engine_name", "device", "context_length", "dimension", "capabilities",
    "load_seconds", "loaded_at", "path", "size_bytes", "state",
)  # fmt: skip


def _load_adapter(slot: TierSlot, backend: Backend, adapter: AdapterRecord) -> None:
    """Load one of the tier's adapters with its model; a bad one fails alone (its requests get 503)."""
    try:
        info = backend.load_adapter(adapter.name, adapter.path)
    except LLMServiceError as exc:
        adapter.status, adapter.error = "failed", exc.message
        log.error("Tier %s: adapter %s failed to load: %s", slot.name, adapter.name, exc.message)
        return
    adapter.loaded(info.rank, info.size_bytes)
    log.info("Tier %s: adapter %s loaded (rank %s)", slot.name, adapter.name, info.rank)


def _drain(worker: GenerationWorker | None, engine: Any) -> None:
    if worker is not None:
        worker.close(timeout=None)  # runs every job already queued, then stops
    if engine is not None:
        engine.close()


async def _log_progress(tier: str, started: float) -> None:
    while True:
        await asyncio.sleep(5)
        log.info("Tier %s: still loading (%.0f s)", tier, time.monotonic() - started)
