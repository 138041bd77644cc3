"""One adapter per model family (generation, embedding, rerank) behind a fixed tier → family table:
how the family's engine is built and loaded into a slot, and how a request reaches the slot's
executor. The registry owns the slots' state; these own what a family's engine is and does."""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeGuard, TypeVar

from backends.base import Backend, GenerationRequest, ImageSpan
from backends.factory import create_backend, create_remote
from backends.remote import REMOTE_REASONING, RemotePool
from backends.remote_relay import Api, Relayed, relay
from embedders.base import Embedder, EmbeddingBatch, EmbeddingJob, EmbeddingRequest
from embedders.factory import create_embedder
from embedders.remote import embedding_batch, embeddings_body
from kernel.config import TierSettings
from kernel.errors import InvalidRequestError, LLMServiceError, ModelUnavailableError
from rerankers.base import PairTokenizing, PairTokens, Reranker, RerankResult
from rerankers.factory import create_reranker
from rerankers.remote import rerank_body, rerank_results
from service.settings import GENERATION_TIERS
from service.tiers.budget import estimate_bytes, probe_gpu_memory
from service.tiers.micro_batcher import MicroBatcher
from service.tiers.model_paths import resolve_draft_path
from service.tiers.slots import AdapterRecord, TierSlot
from service.tiers.workers import ChunkStream, GenerationWorker

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", Backend, Embedder, Reranker)

# Tokenising (for packing, and so the model thread does not) takes ~20 µs for a sentence, less
# than a thread hop: only inputs longer than this go to a thread, where the fast tokenizer runs
# without the GIL beside the model.
_INLINE_TOKENIZE_CHARS = 2000


@dataclass(frozen=True)
class EngineFactories:
    """How each family builds an engine from a tier's settings and resolved model path. The real
    factories import engine modules only when a tier uses them; `service.testing` has fakes."""

    backend: Callable[[TierSettings, str], Backend] = create_backend
    embedder: Callable[[TierSettings, str], Embedder] = create_embedder
    reranker: Callable[[TierSettings, str, Callable[[], Embedder]], Reranker] = create_reranker
    remote: Callable[[TierSettings], RemotePool] = create_remote  # BACKEND=remote: a pool of upstreams
    # The bytes a load will hold, for the memory budget (None: unknown, counted as 0 until loaded).
    estimate: Callable[[TierSettings, str], int | None] = estimate_bytes
    # The GPUs' total memory, MEMORY_BUDGET's default where a tier offloads to one (None: no GPU).
    gpu_memory: Callable[[], int | None] = probe_gpu_memory


class Family(abc.ABC, Generic[E]):
    name: str
    engine_type: type[E]
    per_input = False  # True: the executor queues inputs (texts, pairs), not requests

    @abc.abstractmethod
    def load(self, slot: TierSlot, path: str, engines: EngineFactories, slots: Mapping[str, TierSlot]) -> None:
        """Build and load the engine on this (worker) thread, and set the slot's loaded fields."""

    def queue_limit(self, tier: TierSettings, max_batch_inputs: int) -> int:
        """The executor's bound for `{TIER}_MAX_QUEUE`, in its own units (a request may carry many inputs)."""
        return tier.max_queue * max_batch_inputs if self.per_input else tier.max_queue

    def engine(self, slot: TierSlot) -> E:
        """The slot's engine, of this family's type (a 503 once the model is unloaded; a 400 on a
        remote tier, which has no model of ours: LoRA adapters, a prefix-cache reset)."""
        if isinstance(slot.engine, RemotePool):
            raise InvalidRequestError(f"Tier {slot.name} is remote: it has no model of ours to do this on")
        if not isinstance(slot.engine, self.engine_type):
            raise ModelUnavailableError(f"Tier {slot.name} is not loaded")
        return slot.engine

    def batched(self, slot: TierSlot) -> tuple[E, MicroBatcher[Any, Any]]:
        """The engine and the micro-batcher that runs it (embedding and rerank tiers)."""
        engine, batcher = self.engine(slot), slot.batcher
        if batcher is None:
            raise ModelUnavailableError(f"Tier {slot.name} is not loaded")
        return engine, batcher

    @staticmethod
    def _batcher(
        slot: TierSlot, run: Callable[[list[Any]], list[Any]], cost: Callable[[Any], int]
    ) -> MicroBatcher[Any, Any]:
        tier = slot.settings  # the queue bound is the registry's to set (`queue_limit`)
        return MicroBatcher(
            run,
            max_batch_size=tier.micro_batch_size,
            max_batch_tokens=tier.micro_batch_tokens,
            cost=cost,
            max_wait_ms=tier.micro_batch_wait_ms,
            name=slot.name,
        )


class GenerationFamily(Family[Backend]):
    name = "generation"
    engine_type = Backend

    def load(self, slot: TierSlot, path: str, engines: EngineFactories, slots: Mapping[str, TierSlot]) -> None:
        if slot.settings.backend == "remote":
            self._load_remote(slot, engines)
            return
        backend = engines.backend(resolve_draft_path(slot.settings), path)
        backend.load()
        for adapter in slot.adapters.values():
            _load_adapter(slot, backend, adapter)
        info = backend.info()
        slot.engine, slot.engine_name, slot.device = backend, info.engine, info.device
        slot.context_length, slot.tool_format, slot.reasoning = info.context_length, info.tool_format, info.reasoning
        slot.kv_bytes = info.extras.get("kv_bytes")
        slot.card = dict(info.sampling)
        slot.worker = GenerationWorker(slot.name, backend, slot.settings.max_queue)

    @staticmethod
    def _load_remote(slot: TierSlot, engines: EngineFactories) -> None:
        """A remote tier: the pool is both its engine and its executor; its upstreams apply their own
        templates and parsers, and their structured deltas reach ours as think and Hermes text."""
        _load_pool(slot, engines)
        slot.tool_format, slot.reasoning, slot.card = "hermes", REMOTE_REASONING, {}

    @staticmethod
    def read_card(slot: TierSlot, path: str, engines: EngineFactories) -> None:
        """Set `slot.card` from the model's files where its engine reads them without the weights."""
        if slot.settings.backend == "remote":
            slot.card = {}  # the upstream's model card is its own business
            return
        card = engines.backend(slot.settings, path).read_card()
        if card is not None and slot.card is None:
            slot.card = dict(card)

    @staticmethod
    def generate(slot: TierSlot, request: GenerationRequest, *, background: bool = False) -> ChunkStream:
        """`background`: a batch-job line, queued after every interactive request (see workers)."""
        if slot.worker is None:
            raise ModelUnavailableError(f"Tier {slot.name} is not loaded")
        return slot.worker.submit(request, background=background)

    @staticmethod
    def relays(slot: TierSlot, api: Api) -> bool:
        """Whether the tier passes `api`'s requests to its upstreams as they are (REMOTE_PASSTHROUGH)."""
        return slot.settings.backend == "remote" and api in slot.settings.remote_passthrough

    @staticmethod
    async def relay(slot: TierSlot, api: Api, body: dict[str, Any], model: str, headers: Mapping[str, str]) -> Relayed:
        """`body` to an upstream's own `api` endpoint; `model`: the name the client used."""
        if not isinstance(slot.engine, RemotePool):
            raise ModelUnavailableError(f"Tier {slot.name} is not loaded")
        return await relay(slot.engine, api, body, model, headers)

    async def tokenize(self, slot: TierSlot, request: GenerationRequest) -> list[int]:
        """The prompt's tokens as generation would see them (chat template and tools applied).

        Tokenizers only read the vocabulary, so this runs beside generation, not queued behind it."""
        if isinstance(slot.engine, RemotePool):
            return await slot.engine.tokenize(request)
        return await asyncio.to_thread(self.engine(slot).tokens, request)

    def image_spans(self, slot: TierSlot, prompt: list[int], request: GenerationRequest) -> list[ImageSpan]:
        """Where `prompt` (from `tokenize`) holds the request's images; none from a remote tier."""
        if not request.images or isinstance(slot.engine, RemotePool):
            return []
        return self.engine(slot).image_spans(prompt, request.images)

    async def detokenize(self, slot: TierSlot, tokens: list[int]) -> str:
        if isinstance(slot.engine, RemotePool):
            return await slot.engine.detokenize(tokens)
        backend = self.engine(slot)
        vocab = backend.info().vocab_size
        if vocab and any(not 0 <= t < vocab for t in tokens):
            raise InvalidRequestError(f"tokens must be ids from 0 to {vocab - 1}", param="tokens")
        return await asyncio.to_thread(backend.detokenize, tokens)

    async def on_model_thread(self, slot: TierSlot, fn: Callable[[Backend], T]) -> T:
        """`fn(engine)` on the model's worker thread, between batches; its exception is raised here."""
        worker, engine = slot.worker, self.engine(slot)
        if worker is None:
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


class EmbeddingFamily(Family[Embedder]):
    name = "embedding"
    engine_type = Embedder
    per_input = True

    def load(self, slot: TierSlot, path: str, engines: EngineFactories, slots: Mapping[str, TierSlot]) -> None:
        if slot.settings.backend == "remote":
            pool = _load_pool(slot, engines)
            # One small request tells the dimension (collections record it); EMBEDDING_DIMENSION if none answers.
            probe = pool.probe("/embeddings", embeddings_body(EmbeddingRequest(["dimension"])))
            dense = embedding_batch(probe, EmbeddingRequest(["dimension"])).outputs[0].dense if probe else None
            slot.dimension = len(dense) if dense is not None else slot.settings.embedding_dimension
            slot.capabilities = frozenset({"dense"})
            return
        embedder = engines.embedder(slot.settings, path)
        embedder.load()
        info = embedder.info()
        slot.engine, slot.engine_name, slot.device = embedder, info.engine, info.device
        slot.context_length, slot.dimension, slot.capabilities = info.max_tokens, info.dimension, info.capabilities
        slot.batcher = self._batcher(slot, embedder.embed_jobs, _job_cost)

    async def embed(self, slot: TierSlot, request: EmbeddingRequest, *, background: bool = False) -> EmbeddingBatch:
        if isinstance(slot.engine, RemotePool):
            key = str(request.inputs[:1]).encode()
            return embedding_batch(await slot.engine.post("/embeddings", embeddings_body(request), key), request)
        embedder, batcher = self.batched(slot)
        needs_tokenizer = any(not isinstance(item, str) for item in request.inputs)
        # Decoding token ids takes the model's lock: keep that off the event loop.
        texts = await asyncio.to_thread(embedder.prepare, request) if needs_tokenizer else embedder.prepare(request)
        jobs = await _tokenize(sum(len(t) for t in texts), embedder.jobs, request, texts)
        outputs = await batcher.submit(jobs, background=background)
        return embedder.finish(outputs, request.dimensions)


class RerankFamily(Family[Reranker]):
    name = "rerank"
    engine_type = Reranker
    per_input = True

    def load(self, slot: TierSlot, path: str, engines: EngineFactories, slots: Mapping[str, TierSlot]) -> None:
        if slot.settings.backend == "remote":
            _load_pool(slot, engines)
            return
        source = path.removeprefix("tier:").strip()

        def embedder() -> Embedder:  # asked on every call: the embedding tier may be reloaded
            engine = slots[source].engine if source in slots else None
            if not isinstance(engine, Embedder):
                raise ModelUnavailableError(f"Tier {slot.name} scores with tier {source}, which is not loaded")
            return engine

        reranker = engines.reranker(slot.settings, path, embedder)
        reranker.load()
        info = reranker.info()
        slot.engine, slot.engine_name, slot.device = reranker, info.engine, info.device
        slot.context_length = info.max_tokens
        if _pretokenizes(reranker):
            slot.batcher = self._batcher(slot, reranker.score_tokens, _tokens_cost)
        else:
            slot.batcher = self._batcher(slot, reranker.score_pairs, _pair_cost)

    async def rerank(
        self, slot: TierSlot, query: str, docs: list[str], top_n: int | None, normalize: bool
    ) -> tuple[list[RerankResult], int]:
        """Results best first, and the tokens they cost."""
        if isinstance(slot.engine, RemotePool):
            if not docs:
                return [], 0
            answer = await slot.engine.post("/rerank", rerank_body(query, docs), query.encode())
            return rerank_results(answer, len(docs), top_n)
        reranker, batcher = self.batched(slot)
        if not docs:
            return [], 0
        raw: list[float]
        if _pretokenizes(reranker):
            # Tokenised once, here: for packing, for usage, and so the model thread only runs passes.
            chars = len(query) * len(docs) + sum(len(d) for d in docs)
            pairs = await _tokenize(chars, reranker.tokenize_pairs, query, docs)
            raw = await batcher.submit(pairs)
            tokens = sum(len(p.ids) for p in pairs)
        else:
            raw = await batcher.submit([(query, doc) for doc in docs])
            tokens = await asyncio.to_thread(reranker.count_tokens, query, docs)
        return reranker.rank(raw, top_n, normalize), tokens


GENERATION, EMBEDDING, RERANK = GenerationFamily(), EmbeddingFamily(), RerankFamily()
FAMILIES: Mapping[str, Family[Any]] = {
    **dict.fromkeys(GENERATION_TIERS, GENERATION),
    "embedding": EMBEDDING,
    "reranker": RERANK,
}


def _load_pool(slot: TierSlot, engines: EngineFactories) -> RemotePool:
    """A remote tier of any family: the pool is both its engine and its executor."""
    pool = engines.remote(slot.settings)
    context = pool.load()
    slot.engine, slot.engine_name, slot.device = pool, "remote", ",".join(slot.settings.upstreams)
    slot.context_length = context or slot.settings.n_ctx
    slot.worker = pool
    return pool


def _job_cost(job: EmbeddingJob) -> int:
    return job.cost


async def _tokenize(chars: int, tokenize: Callable[..., T], *args: Any) -> T:
    """`tokenize(*args)` on the event loop for short inputs, in a thread beyond `_INLINE_TOKENIZE_CHARS`."""
    if chars > _INLINE_TOKENIZE_CHARS:
        return await asyncio.to_thread(tokenize, *args)
    return tokenize(*args)


def _pretokenizes(reranker: Reranker) -> TypeGuard[PairTokenizing]:
    return isinstance(reranker, PairTokenizing) and reranker.pretokenizes


def _tokens_cost(pair: PairTokens) -> int:
    return len(pair.ids)


def _pair_cost(pair: tuple[str, str]) -> int:
    # About 4 characters a token, plus the special tokens of a pair; only packing uses it.
    return (len(pair[0]) + len(pair[1])) // 4 + 3


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
