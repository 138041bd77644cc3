"""Between the generation controllers and the registry: limits, the response cache, telemetry.

A deterministic request (temperature 0 or a fixed seed) is looked up in the response cache
before its tier is even loaded; a hit replays the stored chunks, so streaming and non-streaming
clients get the same shapes as from a live model. A miss runs on the tier's worker and is
stored once it finishes normally (not when cancelled or failed).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from backends.base import Chunk, FinishReason, GenerationRequest, Usage
from kernel.errors import InvalidRequestError, LLMServiceError, ModelUnavailableError
from service.cache import CachedGeneration, ResponseCache
from service.metrics import RequestRecord
from service.serving.input_limits import check_prompt_length
from service.serving.streaming import Drain
from service.settings import Settings
from service.tiers.families import GENERATION
from service.tiers.registry import Registry
from service.tiers.slots import TierSlot
from service.tiers.workers import ChunkStream, JobStream

T = TypeVar("T")


class Dispatcher:
    def __init__(self, registry: Registry, cache: ResponseCache, settings: Settings) -> None:
        self.registry = registry
        self.cache = cache
        self.max_tokens_limit = settings.max_tokens_limit
        self.drain = Drain()  # begun by the server when it starts shutting down

    async def generate(
        self, kind: str, slot: TierSlot, request: GenerationRequest, record: RequestRecord, *, background: bool = False
    ) -> ChunkStream:
        if request.max_tokens > self.max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens is {request.max_tokens}, above this server's limit of {self.max_tokens_limit}"
                " (MAX_TOKENS_LIMIT)",
                param="max_tokens",
            )
        # Before the cache and the model's thread: tokenising a huge prompt would hold the tier.
        check_prompt_length(request, slot.context_length or slot.settings.n_ctx)
        record.tier = slot.name
        payload: Any = request
        adapter = None
        if request.adapter is not None:
            adapter = self.registry.adapter(slot, request.adapter)  # 404 once unloaded, even if cached
            payload = (request, adapter.fingerprint or adapter.path)  # a new file under the name: new answers
        key = self.cache.key(kind, slot, payload) if is_deterministic(request) else None
        if key is not None:
            hit = self.cache.get(key, CachedGeneration)
            record.cache = "miss" if hit is None else "hit"
            if hit is not None:
                return ReplayStream(hit)
        await self.registry.ensure_loaded(slot)
        if adapter is not None:
            if adapter.status == "failed":
                reason = f"Adapter {adapter.name} of tier {slot.name} failed to load: {adapter.error}"
                raise ModelUnavailableError(reason)
            adapter.requests += 1
        stream = GENERATION.generate(slot, request, background=background)
        store = (lambda value: self.cache.put(key, value)) if key is not None else None
        return RecordingStream(stream, record, store)

    async def choices(
        self,
        kind: str,
        slot: TierSlot,
        request: GenerationRequest,
        record: RequestRecord,
        n: int,
        *,
        background: bool = False,
    ) -> list[ChunkStream]:
        """OpenAI's `n`: one job per choice, decoded side by side where the engine batches. A fixed
        seed moves on by one per choice, so seeded choices differ yet stay reproducible."""
        if n > slot.settings.max_queue:
            raise InvalidRequestError(
                f"n is {n}, above the {slot.settings.max_queue} requests tier {slot.name} queues"
                f" ({slot.name.upper()}_MAX_QUEUE)",
                param="n",
            )
        streams: list[ChunkStream] = []
        try:
            for i in range(n):
                seed = None if request.seed is None else (request.seed + i) % 2**32
                streams.append(
                    await self.generate(kind, slot, replace(request, seed=seed), record, background=background)
                )
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    async def cached(
        self,
        kind: str,
        slot: TierSlot,
        payload: Any,
        type_: type[T],
        record: RequestRecord,
        compute: Callable[[], Awaitable[T]],
    ) -> T:
        """For deterministic endpoints (embeddings, rerank): `compute()`'s result, from the cache when
        an identical `payload` (any msgspec-encodable request) was answered before."""
        record.tier = slot.name
        key = self.cache.key(kind, slot, payload)
        hit = self.cache.get(key, type_)
        if key is not None:
            record.cache = "miss" if hit is None else "hit"
        if hit is not None:
            return hit
        value = await compute()
        self.cache.put(key, value)
        return value


def is_deterministic(request: GenerationRequest) -> bool:
    # A cached answer keeps only its text: one that asked for logprobs is not served from it.
    return (request.temperature == 0 or request.seed is not None) and not request.logprobs


class ReplayStream:
    """A cached generation as the chunks a live one would produce."""

    def __init__(self, cached: CachedGeneration) -> None:
        self._chunks = self._replay(cached)

    @staticmethod
    async def _replay(cached: CachedGeneration) -> AsyncIterator[Chunk]:
        for piece in cached.pieces:
            yield Chunk(piece)
        finish: FinishReason = "length" if cached.finish_reason == "length" else "stop"
        # The whole prompt was served from a cache: say so in usage.prompt_tokens_details.cached_tokens.
        usage = Usage(cached.prompt_tokens, cached.completion_tokens, cached_tokens=cached.prompt_tokens)
        yield Chunk("", finish_reason=finish, usage=usage)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        return await anext(self._chunks)

    def cancel(self) -> None:
        pass


class RecordingStream:
    """A live job's chunks, noting time to first token and usage, and storing the result."""

    def __init__(
        self, stream: JobStream, record: RequestRecord, store: Callable[[CachedGeneration], None] | None
    ) -> None:
        self._stream = stream
        self._record = record
        self._store = store
        self._pieces: list[str] = []
        record.generated = True

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        try:
            chunk = await anext(self._stream)
        except LLMServiceError:
            self._record.failed = True
            raise
        record = self._record
        if record.ttft is None:
            record.ttft = time.monotonic() - record.started
        if chunk.text:
            self._pieces.append(chunk.text)
        if chunk.usage is not None:
            usage = chunk.usage
            # Several choices (n > 1) share one prompt: its tokens count once, generated ones add up.
            record.prompt_tokens = max(record.prompt_tokens, usage.prompt_tokens)
            record.completion_tokens += usage.completion_tokens
            record.cached_tokens = max(record.cached_tokens, usage.cached_tokens)
            if self._store is not None and chunk.finish_reason is not None:
                self._store(
                    CachedGeneration(self._pieces, chunk.finish_reason, usage.prompt_tokens, usage.completion_tokens)
                )
        return chunk

    def cancel(self) -> None:
        self._stream.cancel()
