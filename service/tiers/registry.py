"""The registry: the tiers' slots and their lifecycle (load, unload, replace, retune), and which
tier a request names. What a family's engine is and does lives in service.tiers.families; the request
path is controller → serving → registry (a loaded slot) → executor → engine."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol

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
from service.settings import TIERS, Settings, model_aliases
from service.tiers import routing
from service.tiers.budget import Holding, MemoryBudget, MemoryBudgetExceeded, budget_total
from service.tiers.catalogue import Catalogue, CatalogueEntry
from service.tiers.executor import Executor
from service.tiers.families import FAMILIES, GENERATION, EngineFactories
from service.tiers.model_paths import disk_size, resolve_model_path
from service.tiers.routing import model_name, shown
from service.tiers.slots import AdapterRecord, TierSlot, TierState

log = logging.getLogger(__name__)

# The tier whose family (engine, executor, requests) a catalogue model of each kind belongs to.
_CATALOGUE_FAMILY = {"generation": "light", "embedding": "embedding", "reranker": "reranker"}


class Registry:
    def __init__(self, settings: Settings, engines: EngineFactories | None = None) -> None:
        """`engines`: how each family builds its engine (the real, lazily imported ones by default)."""
        self.settings = settings
        self.engines = engines or EngineFactories()
        self.started = time.time()
        self.aliases = model_aliases(settings.model_aliases)  # (glob, tier) pairs, first match wins
        # One model load at a time, in tier order at start-up: two libraries initialising a GPU
        # runtime at once (torch and llama.cpp's CUDA build) is what a load must never race into.
        self._loading = asyncio.Lock()
        self.catalogue = Catalogue(settings.models_dir)
        self.slots: dict[str, TierSlot] = {}
        self._startup: set[asyncio.Task[None]] = set()  # the preloads: requests wait LOAD_WAIT_SECONDS for these
        self._scan: asyncio.Task[None] | None = None
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
        self.budget = MemoryBudget(budget_total(settings.memory_budget, self._offloads(), self.engines.gpu_memory))

    def _offloads(self) -> bool:
        """Whether a model may load into a GPU: a local tier with N_GPU_LAYERS != 0, or MODELS_DIR
        (its models load with a tier's defaults, which offload every layer)."""
        local = [s.settings for s in self.configured() if not s.remote]
        return any(t.n_gpu_layers != 0 for t in local) or bool(self.settings.models_dir)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        for slot in self.configured():
            if slot.settings.preload:
                task = self._begin_load(slot)
                task.add_done_callback(_retrieved)  # its failure is logged by `_load`, and kept in the slot
                self._startup.add(task)
        if self.settings.models_dir:  # read now, so a catalogue model's first use finds its entry and header read
            self._scan = asyncio.create_task(asyncio.to_thread(self._scan_catalogue), name="catalogue-scan")

    def _scan_catalogue(self) -> None:
        try:
            self.catalogue.entries()
        except OSError as exc:  # a request scans again, and says so
            log.warning("MODELS_DIR %s could not be read: %s", self.settings.models_dir, exc)

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
            await _free(slot, slot.executor, slot.engine, drain=False)
            slot.worker = slot.batcher = slot.engine = None
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
        pending, executor, engine = self._withdraw(slot)
        await self._retire(slot, executor, engine)
        log.info("Tier %s: unloaded", slot.name)
        return pending

    def _withdraw(self, slot: TierSlot) -> tuple[int, Executor | None, _Closable | None]:
        """Take a loaded model out of service at once (no await: nothing can pick it meanwhile);
        what it holds is freed by `_retire`."""
        pending, executor, engine = slot.in_flight, slot.executor, slot.engine
        slot.worker = slot.engine = slot.batcher = None
        slot.state = TierState.AVAILABLE
        self.budget.release(slot.name)
        for adapter in slot.adapters.values():
            if adapter.status == "loaded":
                adapter.status = "available"  # loads again with the model
        log.info("Tier %s: unloading %s (%d requests in flight finish first)", slot.name, slot.id, pending)
        return pending, executor, engine

    async def _retire(self, slot: TierSlot, executor: Executor | None, engine: _Closable | None) -> None:
        """Free a model taken out of `slot` once the requests it already accepted have finished."""

        slot.draining = asyncio.create_task(_free(slot, executor, engine, drain=True), name=f"drain-{slot.name}")
        await asyncio.shield(slot.draining)

    async def replace(self, slot: TierSlot, settings: TierSettings) -> str | None:
        """Serve the model `settings` names from `slot`: load it beside the current one, swap, then
        retire the old one once its requests finish. Returns the id of the model it replaced. If the
        new one fails to load, `slot` is left exactly as it was (a loaded model keeps serving)."""
        if slot.load_task is not None and not slot.load_task.done():
            await asyncio.shield(slot.load_task)
        staging = TierSlot(slot.name, settings, TierState.LOADING, model=model_name(settings))
        staging.adapters = slot.adapters  # the tier's adapters, loaded into the new model (or failing there)
        # Both models are in memory until the swap: the new one is admitted beside the old one (which
        # is never evicted for it), like any load; a 503 if it does not fit.
        beside = f"{slot.name} (replacement)" if slot.state is TierState.LOADED else None
        await asyncio.shield(self._load(staging, key=beside, keep=slot.name))
        if staging.state is not TierState.LOADED:
            kept = f"{slot.id} keeps serving" if slot.state is TierState.LOADED else f"tier {slot.name} is unchanged"
            raise InvalidRequestError(
                f"Could not load {settings.model_path}: {staging.error}; {kept}",
                param="model_path",
                code="model_load_failed",
            )
        old_id = slot.id if slot.state is TierState.LOADED else None
        old = (slot.executor, slot.engine)
        for name in TierSlot.LOADED_FIELDS:
            setattr(slot, name, getattr(staging, name))
        slot.settings, slot.model, slot.error, slot.card = settings, staging.model, None, staging.card
        slot.estimate_bytes = staging.estimate_bytes
        if beside is not None:  # the old model's reservation goes with it; the new one's takes the tier's name
            self.budget.rename(beside, slot.name)
        if old_id is not None:
            log.info("Tier %s: %s replaced by %s; retiring the old model", slot.name, old_id, slot.id)
            await self._retire(slot, *old)
        return old_id

    def retune(self, slot: TierSlot, settings: TierSettings) -> None:
        """New per-tier defaults for requests from now on (PATCH /v1/config); the queue bound goes
        to the loaded model's executor too, the rest is read from `slot.settings` per request."""
        slot.settings = settings
        self._bound(slot)

    def _bound(self, slot: TierSlot) -> None:
        if slot.executor is not None:
            limit = FAMILIES[slot.family_key].queue_limit(slot.settings, self.settings.max_batch_inputs)
            slot.executor.set_queue_limit(limit)

    def _begin_load(self, slot: TierSlot) -> asyncio.Task[None]:
        if slot.load_task is None or (slot.load_task.done() and slot.state is not TierState.LOADED):
            slot.state = TierState.LOADING
            slot.error = None
            slot.load_task = asyncio.create_task(self._load(slot), name=f"load-{slot.name}")
        return slot.load_task

    async def _load(self, slot: TierSlot, *, key: str | None = None, keep: str | None = None) -> None:
        """`key`: the name the load's reservation is held under (a replacement's, beside the tier's
        own); `keep`: a model never unloaded to make room for this one."""
        key = key or slot.name
        if slot.draining is not None:  # never two copies in memory: the old one finishes first
            await asyncio.shield(slot.draining)
        log.info("Tier %s: loading %s", slot.name, slot.settings.model_path)
        started = time.monotonic()
        progress = asyncio.create_task(_log_progress(slot.name, started))
        try:
            await self._load_dependency(slot)
            async with self._loading:  # room is made in load order: the start-up order holds
                await self._make_room(slot, key=key, keep=keep)
                await asyncio.to_thread(self._load_sync, slot)
        except MemoryBudgetExceeded as exc:  # not a broken model: the next request tries again
            slot.state, slot.error = TierState.AVAILABLE, exc.message
            if asyncio.current_task() in self._startup:  # no request waits for it: nothing else will say so
                log.error("Tier %s: not preloaded: %s", slot.name, exc.message)
            else:
                log.warning("Tier %s: not loaded: %s", slot.name, exc.message)
            raise
        except LLMServiceError as exc:
            self.budget.release(key)
            slot.state, slot.error = TierState.FAILED, exc.message
            log.error("Tier %s: failed to load: %s", slot.name, exc.message)
            return
        except Exception as exc:
            self.budget.release(key)
            slot.state, slot.error = TierState.FAILED, f"{type(exc).__name__}: {exc}"
            log.exception("Tier %s: failed to load", slot.name)
            return
        finally:
            progress.cancel()
            slot.resolved = None  # the next load resolves MODEL_PATH afresh
        slot.load_seconds = time.monotonic() - started
        self.budget.settle(key, self._held_bytes(slot))
        slot.loaded_at = time.time()
        slot.state = TierState.LOADED
        sampling = f"; sampling defaults {slot.sampling_text()}" if slot.card is not None else ""
        log.info(
            "Tier %s: %s loaded on %s in %.1f s%s", slot.name, slot.id, slot.engine_name, slot.load_seconds, sampling
        )

    async def _make_room(self, slot: TierSlot, *, key: str, keep: str | None) -> None:
        """Reserve the load's estimate within MEMORY_BUDGET under `key`, first unloading the least
        recently used idle models it needs gone, never `keep` (a 503 naming what holds the memory if
        that is not enough)."""
        if slot.remote:
            return
        estimate = await asyncio.to_thread(self._estimate, slot) or 0
        slot.estimate_bytes = estimate
        admission = self.budget.admit(key, estimate, self._holdings(keep))
        victims = [self.slots[name] for name in admission.victims]
        withdrawn = [(v, *self._withdraw(v)[1:]) for v in victims]  # all at once: none serves again meanwhile
        for victim, executor, engine in withdrawn:
            log.info("Tier %s: unloaded to make room for %s (MEMORY_BUDGET)", victim.name, slot.name)
            await self._retire(victim, executor, engine)

    def _holdings(self, keep: str | None = None) -> list[Holding]:
        # A reranker scoring with `tier:<name>` needs that tier loaded: it stays while the reranker is in memory.
        needed = {
            spec.removeprefix("tier:").strip()
            for s in self.slots.values()
            if s.state in (TierState.LOADED, TierState.LOADING)
            and (spec := (s.settings.model_path or "").strip()).startswith("tier:")
        }
        return [
            Holding(
                s.name,
                s.last_used or s.loaded_at or 0.0,
                pinned=s.settings.pin or s.name in needed or s.name == keep,
                busy=bool(s.in_flight or (s.executor and s.executor.waiting)),
                loading=s.state is TierState.LOADING or (s.draining is not None and not s.draining.done()),
            )
            for s in self.slots.values()
        ]

    @staticmethod
    def _held_bytes(slot: TierSlot) -> int:
        """What a loaded model holds: its files plus the KV its engine reports (llama.cpp), else the estimate."""
        if slot.size_bytes is None or slot.kv_bytes is None:
            return slot.estimate_bytes or 0
        return slot.size_bytes + slot.kv_bytes

    def _estimate(self, slot: TierSlot) -> int | None:
        return self.engines.estimate(slot.settings, self._model_path(slot))

    @staticmethod
    def _model_path(slot: TierSlot) -> str:
        """The slot's MODEL_PATH resolved, once per load (see `TierSlot.resolved`)."""
        spec = slot.settings.model_path or ""
        if slot.resolved is None or slot.resolved[0] != spec:
            slot.resolved = (spec, resolve_model_path(spec))
        return slot.resolved[1]

    def _load_sync(self, slot: TierSlot) -> None:
        remote = slot.settings.backend == "remote"  # no files: its upstreams hold the model
        path = "" if remote else self._model_path(slot)
        slot.path, slot.size_bytes = path or None, None if remote else disk_size(path)
        if slot.size_bytes is not None:
            log.info("Tier %s: reading %s (%.0f MiB)", slot.name, path, slot.size_bytes / 2**20)
        FAMILIES[slot.family_key].load(slot, path, self.engines, self.slots)
        self._bound(slot)

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

    async def ensure_loaded(self, slot: TierSlot) -> TierSlot:
        """`slot` with its model loaded and an executor to take work (loading it if need be), counted as used."""
        await self.ready(slot)
        slot.last_used = time.time()
        slot.requests += 1
        return slot

    async def read_card(self, slot: TierSlot) -> None:
        """Make a generation tier's `card` known: from the model's files where its engine can read them
        without the weights (a cached answer then needs no model), else by loading the model."""
        if slot.card is None:
            try:
                path = await asyncio.to_thread(self._model_path, slot)
                await asyncio.to_thread(GENERATION.read_card, slot, path, self.engines)
            except LLMServiceError:
                pass  # the load below reports it
        if slot.card is None:
            await self.ready(slot)

    async def ready(self, slot: TierSlot) -> None:
        """Load `slot`'s model if need be, or wait for the load under way (a start-up load: 503 after
        LOAD_WAIT_SECONDS)."""
        while True:
            if slot.state is TierState.ABSENT:
                raise TierNotConfiguredError(slot.name)
            if slot.state is TierState.LOADING and slot.load_task in self._startup:
                # A start-up load: wait LOAD_WAIT_SECONDS, then 503 + Retry-After (the server is starting).
                try:
                    await asyncio.wait_for(asyncio.shield(slot.load_task), self.settings.load_wait_seconds)
                except TimeoutError:
                    raise ModelLoadingError(slot.name) from None
            elif slot.state is TierState.LOADING and slot.load_task is not None:
                # A load on demand (a first use, an admin load): wait for that one load, as its first request does.
                await asyncio.shield(slot.load_task)
            elif slot.state is TierState.AVAILABLE:  # not loaded yet (lazy tier, or unloaded): this request loads it
                await asyncio.shield(self._begin_load(slot))
            if slot.state is TierState.FAILED:
                raise ModelUnavailableError(f"Tier {slot.name} failed to load: {slot.error}")
            if slot.executor is not None:  # else unloaded again meanwhile: load it again
                return

    # -- routing ---------------------------------------------------------------------------
    def configured(self) -> list[TierSlot]:
        return routing.configured(self.slots)

    def resolve(self, model: str) -> TierSlot:
        """A tier's exact name first, then a catalogue id (a model in MODELS_DIR, given a slot of its
        own on first use), then aliases and the tiers' name patterns."""
        key = model.strip()
        if routing.exact(key.lower(), self.slots) is None and (entry := self.catalogue.get(key)) is not None:
            return self._catalogue_slot(entry)
        return routing.resolve(model, self.slots, self.aliases)

    def _catalogue_slot(self, entry: CatalogueEntry) -> TierSlot:
        """The slot of a catalogue model: loaded on first use with its MODEL_SETTINGS (else a tier's
        defaults), then kept, unloaded and evicted like any tier (KEEP_ALIVE, unload, the memory budget)."""
        slot = self.slots.get(entry.id)
        if slot is None or slot.settings.model_path != entry.path:
            settings = self.settings.catalogue_model(entry.id, entry.path)
            family = _CATALOGUE_FAMILY[entry.kind]
            slot = TierSlot(entry.id, settings, TierState.AVAILABLE, model=entry.id, family=family)
            self.slots[entry.id] = slot
        return slot

    def generation_slot(self, model: str) -> TierSlot:
        """The generation tier for `model`, without loading it (a cached answer needs no model)."""
        slot = self._configured(model)
        if FAMILIES[slot.family_key] is not GENERATION:
            raise ModelNotFoundError(
                f"Model {shown(model)} is served by the {slot.name} tier, which does not generate text"
            )
        return slot

    def generation_target(self, model: str, adapter: str | None = None) -> Target:
        """The generation tier and LoRA adapter a request names: `model: "<model>:<adapter>"` (where
        `<model>` names a tier exactly) and/or the `adapter` field. 404 adapter_not_found for an
        adapter the tier does not have. Every generating route (HTTP, WebSocket, batch lines, RAG
        chat) resolves its model here, once: the target carries the adapter's record on."""
        named = self._adapter_in_name(model)
        if named is None:
            slot, param = self.generation_slot(model), "adapter"
        else:
            slot, param = self.generation_slot(named[0]), "model"
            if adapter is not None and adapter != named[1]:
                raise InvalidRequestError(
                    f"model names adapter {shown(named[1])} but adapter is {shown(adapter)}", param="adapter"
                )
            adapter = named[1]
        return Target(slot, None if adapter is None else self.adapter(slot, adapter, param=param))

    async def tier_for(self, model: str, tier: str) -> TierSlot:
        """The `tier` (embedding or reranker) that `model` names, loaded."""
        return await self.ensure_loaded(self.tier_slot(model, tier))

    def tier_slot(self, model: str, tier: str, adapter: str | None = None) -> TierSlot:
        """The `tier` (embedding or reranker) that `model` names, without loading it (a cached answer
        needs no model); such tiers take no adapter, so one named (the field or `<tier>:<adapter>`)
        is a 400, not silently ignored."""
        named = self._adapter_in_name(model)
        if adapter is not None or (named is not None and named[0] == tier):
            raise InvalidRequestError(
                f"The {tier} tier takes no LoRA adapter (adapters are for generation tiers)",
                param="adapter" if adapter is not None else "model",
            )
        slot = self._configured(model)
        if slot.family_key != tier:
            raise InvalidRequestError(
                f"Model {shown(model)} is served by the {slot.name} tier; this endpoint needs the {tier} tier",
                param="model",
            )
        return slot

    def _adapter_in_name(self, model: str) -> tuple[str, str] | None:
        """(tier, adapter) when `model` is `<name of a tier>:<adapter>`."""
        base, sep, named = model.strip().rpartition(":")
        exact = routing.exact(base.lower(), self.slots) if sep and base and named else None
        return None if exact is None else (exact.name, named)

    def _configured(self, model: str) -> TierSlot:
        slot = self.resolve(model)
        if slot.state is TierState.ABSENT:
            raise TierNotConfiguredError(slot.name)
        return slot

    # -- adapters --------------------------------------------------------------------------
    def adapter(self, slot: TierSlot, name: str, *, param: str = "adapter") -> AdapterRecord:
        record = slot.adapters.get(name)
        if record is None:
            raise AdapterNotFoundError(name, f"tier {slot.name}", sorted(slot.adapters), param=param)
        return record

    async def load_adapter(self, slot: TierSlot, name: str, path: str) -> AdapterRecord:
        """Load an adapter into the tier's model now (loading the model first if need be); it is
        kept for the tier from then on, across model reloads, until unloaded."""
        if FAMILIES[slot.family_key] is not GENERATION:
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
        info = await GENERATION.on_model_thread(slot, lambda engine: engine.load_adapter(name, path))
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
            await GENERATION.on_model_thread(slot, lambda engine: engine.unload_adapter(name))
        record.status = "unloaded"
        log.info("Tier %s: adapter %s unloaded", slot.name, name)
        return record

    # -- views -----------------------------------------------------------------------------
    def catalogue_entry(self, slot: TierSlot) -> CatalogueEntry | None:
        """The MODELS_DIR entry a tier's MODEL_PATH (or a catalogue model's slot) points at, if any."""
        path = slot.settings.model_path
        if not path or not self.catalogue.models_dir:
            return None
        wanted = os.path.abspath(os.path.expanduser(path))
        return next((e for e in self.catalogue.entries().values() if os.path.abspath(e.path) == wanted), None)

    def uptime(self) -> float:
        return time.time() - self.started


@dataclass(frozen=True, slots=True)
class Target:
    """Where a generation request goes: its tier, and the LoRA adapter it names (if any)."""

    slot: TierSlot
    adapter: AdapterRecord | None

    @property
    def adapter_name(self) -> str | None:
        return None if self.adapter is None else self.adapter.name


class _Closable(Protocol):
    def close(self) -> None: ...


async def _free(slot: TierSlot, executor: Executor | None, engine: _Closable | None, *, drain: bool) -> None:
    """Stop the executor (`drain`: after the requests it accepted, else cancelling them), then free
    the engine, only if nothing runs on it any more: a model freed under a running step crashes
    the process, one left allocated only costs memory."""
    stopped = True
    if executor is not None:
        stopped = await (executor.retire() if drain else executor.stop())
    if engine is None:
        return
    if not stopped:
        log.error("Tier %s: the model's thread did not stop in time; its memory is not freed", slot.name)
        return
    await asyncio.to_thread(engine.close)


def _retrieved(task: asyncio.Task[None]) -> None:
    """Mark a start-up load's exception as seen (asyncio would print it again with a traceback)."""
    if not task.cancelled():
        task.exception()


async def _log_progress(tier: str, started: float) -> None:
    while True:
        await asyncio.sleep(5)
        log.info("Tier %s: still loading (%.0f s)", tier, time.monotonic() - started)
