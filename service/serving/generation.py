"""Generation: the one serving object of every endpoint that generates text (chat, completions,
messages, responses, the WebSocket, batch lines), and the helpers their adapters share to turn a
wire request into one engine request and the engine's chunks back into answers.

The request skeleton, written once here: bound max_tokens and the prompt, ask the response cache
(a deterministic request is looked up before its tier is even loaded, and a hit replays the stored
chunks, so streaming and non-streaming clients get the shapes a live model gives), load the tier,
count the adapter, submit to the tier's worker. A miss is stored once it finishes normally (not
when cancelled or failed).
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from backends.base import (
    RANDOM_SEED,
    Chunk,
    FinishReason,
    GenerationRequest,
    ImageInput,
    ImageSpan,
    ResponseFormat,
    Token,
    Usage,
)
from kernel.config import SAMPLING_FIELDS, Sampling, TierSettings
from kernel.errors import (
    InvalidRequestError,
    LLMServiceError,
    ModelUnavailableError,
    RateLimitError,
    UpstreamUnavailableError,
)
from service.cache import CachedGeneration, ResponseCache
from service.metrics import RequestRecord
from service.schemas.chat import ChoiceLogprobs
from service.schemas.common import (
    PromptTokensDetails,
    ResponseFormatSpec,
    SamplingFields,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from service.serving.cached import lookup
from service.serving.drain import Drain
from service.serving.images import ImageLoader
from service.serving.input_limits import check_prompt_length
from service.serving.schema_limits import check_schema
from service.serving.thinking import ThinkingControl
from service.settings import Settings
from service.tiers.families import GENERATION
from service.tiers.registry import Registry, Target
from service.tiers.slots import TierSlot
from service.tiers.workers import ChunkStream


@dataclass(frozen=True, slots=True)
class Tokens:
    """A prompt's token ids, the context (in tokens) of the model that read them, and where the
    ids hold images' places (`ImageSpan`)."""

    ids: list[int]
    context: int
    images: tuple[ImageSpan, ...] = ()


class Generation:
    """Created once by the app; every generating route goes through it: `target` (which tier and
    adapter), then `generate` (the skeleton) or `tokens` (the same prompt bound, then the tokenizer)."""

    def __init__(self, registry: Registry, cache: ResponseCache, settings: Settings) -> None:
        self.registry = registry
        self.cache = cache
        self.settings = settings
        self.images = ImageLoader(settings)  # decodes requests' images, keeping recent ones (IMAGE_CACHE_BYTES)
        self.max_tokens_limit = settings.max_tokens_limit
        self.drain = Drain()  # begun by the server when it starts shutting down

    def target(self, model: str, adapter: str | None = None) -> Target:
        """The tier and adapter a request names (404 for an unknown model or adapter), without loading it."""
        return self.registry.generation_target(model, adapter)

    async def sampling(self, target: Target, fields: SamplingFields) -> Sampling:
        """The tier's sampling defaults for what `fields` leaves out. A request that would take one from
        the model card, before the tier has loaded once, waits for the card to be read (`Registry.read_card`)."""
        slot = target.slot
        if slot.card is None and any(
            getattr(fields, name) is None and getattr(slot.settings, name) is None for name in SAMPLING_FIELDS
        ):
            await self.registry.read_card(slot)
        return slot.sampling()[0]

    async def generate(
        self,
        kind: str,
        target: Target,
        request: GenerationRequest,
        record: RequestRecord,
        *,
        n: int = 1,
        background: bool = False,
    ) -> list[ChunkStream]:
        """The chunk streams of `n` choices (OpenAI's `n`: one job per choice, decoded side by side
        where the engine batches); `kind` names the cache's answers ("chat" is shared by every chat-like
        API). A fixed seed moves on by one per choice, so seeded choices differ yet stay reproducible.
        `background`: a batch-job line, queued behind interactive requests (see service/tiers/workers.py)."""
        slot = target.slot
        if n > slot.settings.max_queue:
            raise InvalidRequestError(
                f"n is {n}, above the {slot.settings.max_queue} requests tier {slot.name} queues"
                f" ({slot.name.upper()}_MAX_QUEUE)",
                param="n",
            )
        if request.max_tokens > self.max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens is {request.max_tokens}, above this server's limit of {self.max_tokens_limit}"
                " (MAX_TOKENS_LIMIT)",
                param="max_tokens",
            )
        # Before the cache and the model's thread: tokenising a huge prompt would hold the tier.
        check_prompt_length(request, slot.context_length or slot.settings.n_ctx)
        record.tier = slot.name
        streams: list[ChunkStream] = []
        try:
            for i in range(n):
                # Modulo RANDOM_SEED: a fixed seed never moves on to the one that means "random".
                fixed = request.fixed_seed
                seed = request.seed if fixed is None else (fixed + i) % RANDOM_SEED
                # A copy only where the seed moves (`replace` of the request: ~15 us).
                choice = request if seed == request.seed else replace(request, seed=seed)
                streams.append(await self._start(kind, target, choice, record, background))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    async def _start(
        self, kind: str, target: Target, request: GenerationRequest, record: RequestRecord, background: bool
    ) -> ChunkStream:
        """One choice: replayed from the cache, or a job on the tier's worker."""
        slot, adapter = target.slot, target.adapter
        key: str | None = None
        if _is_deterministic(request):
            keyed = replace(request, affinity=None)  # who asks does not change the answer
            # A new file under the adapter's name gives new answers: its fingerprint is part of the key.
            payload: Any = keyed if adapter is None else (keyed, adapter.fingerprint or adapter.path)
            key, hit = lookup(self.cache, kind, slot, payload, CachedGeneration, record)
            if hit is not None:
                return _Replay(hit)
        await self.registry.ensure_loaded(slot)
        if adapter is not None:
            if adapter.status == "failed":
                raise ModelUnavailableError(
                    f"Adapter {adapter.name} of tier {slot.name} failed to load: {adapter.error}"
                )
            adapter.requests += 1
        try:
            stream = GENERATION.generate(slot, request, background=background)
        except RateLimitError as exc:
            spare = self._overflow(slot, target, exc)
            try:
                stream = GENERATION.generate(await self.registry.ensure_loaded(spare), request, background=background)
            except UpstreamUnavailableError:  # a remote spare with every upstream ejected: the full queue's 429
                raise exc from None
            slot.overflowed += 1
            record.tier, key = spare.name, None  # another model's answer: not stored under this tier's key
        return _Recording(stream, record, None if key is None else functools.partial(self.cache.put, key))

    def _overflow(self, slot: TierSlot, target: Target, full: RateLimitError) -> TierSlot:
        """The tier that takes what `slot`'s full queue refused (`<TIER>_OVERFLOW`), one hop only;
        else `full` again. An adapter's request stays: the other tier lacks the adapter."""
        spare = self.registry.slots.get(slot.settings.overflow or "")
        if full.code != "queue_full" or spare is None or target.adapter is not None:
            raise full
        return spare

    async def tokens(self, target: Target, request: GenerationRequest) -> Tokens:
        """The prompt's tokens as generation would see them (chat template and tools applied),
        under the prompt bound generation has: the tokenizer runs on the model's engine."""
        slot = await self.registry.ensure_loaded(target.slot)
        context = slot.context_length or slot.settings.n_ctx
        check_prompt_length(request, context)
        ids = await GENERATION.tokenize(slot, request)
        return Tokens(ids, context, tuple(GENERATION.image_spans(slot, ids, request)))

    async def detokenize(self, model: str, ids: list[int]) -> str:
        slot = await self.registry.ensure_loaded(self.target(model).slot)
        return await GENERATION.detokenize(slot, ids)


def _is_deterministic(request: GenerationRequest) -> bool:
    # A cached answer keeps only its text: one that asked for logprobs is not served from it.
    return (request.temperature == 0 or request.fixed_seed is not None) and not request.logprobs


class _Replay:
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


class _Recording:
    """A live job's chunks, noting time to first token and usage, and storing the result."""

    def __init__(
        self, stream: ChunkStream, record: RequestRecord, store: Callable[[CachedGeneration], None] | None
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


# -- what every generation API's adapter shares ------------------------------------------------


def now() -> int:
    return int(time.time())


def engine_request(
    fields: SamplingFields,
    tier: TierSettings,
    sampling: Sampling,
    *,
    max_tokens: int | None,
    prompt: str | list[int] = "",
    messages: tuple[dict[str, Any], ...] | None = None,
    images: tuple[ImageInput, ...] = (),
    tools: tuple[dict[str, Any], ...] | None = None,
    constraint: ResponseFormat | None = None,
    logprobs: bool = False,
    top_logprobs: int = 0,
    prompt_logprobs: bool = False,
    adapter: str | None = None,
    thinking: ThinkingControl | None = None,
) -> GenerationRequest:
    """Apply the tier's defaults to whatever the request left out (`sampling`: `Generation.sampling`'s)."""
    thinking = thinking or ThinkingControl()
    stop = (fields.stop,) if isinstance(fields.stop, str) else tuple(fields.stop or ())
    if len(stop) > 16:
        raise InvalidRequestError("At most 16 stop sequences are supported", param="stop")
    return GenerationRequest(
        prompt=prompt,
        messages=messages,
        images=images,
        tools=tools,
        max_tokens=max_tokens or tier.max_tokens,
        temperature=sampling.temperature if fields.temperature is None else fields.temperature,
        top_p=sampling.top_p if fields.top_p is None else fields.top_p,
        top_k=sampling.top_k if fields.top_k is None else fields.top_k,
        min_p=sampling.min_p if fields.min_p is None else fields.min_p,
        repeat_penalty=sampling.repeat_penalty if fields.repeat_penalty is None else fields.repeat_penalty,
        presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        logit_bias=_logit_bias(fields.logit_bias),
        seed=fields.seed,
        stop=stop,
        response_format=constraint or _response_format(fields.response_format),
        logprobs=logprobs or top_logprobs > 0,
        top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs,
        adapter=adapter,
        thinking=thinking.enabled,
        thinking_budget=thinking.budget,
        template_kwargs=thinking.template_kwargs,
        affinity=fields.prompt_cache_key or fields.user,
    )


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"<token id>": bias}; the engine checks the ids against its vocabulary."""
    try:
        return tuple((int(token), value) for token, value in (bias or {}).items())
    except ValueError:
        raise InvalidRequestError("logit_bias keys must be token ids", param="logit_bias") from None


def chat_logprobs(chunk: Chunk) -> ChoiceLogprobs | None:
    """A chunk's scored tokens in the chat shape (None when the request asked for no logprobs)."""
    if not chunk.scored:
        return None
    return ChoiceLogprobs(
        [
            TokenLogprob(
                t.logprob.token,
                t.logprob.logprob,
                list(t.logprob.raw),
                [TopLogprob(a.token, a.logprob, list(a.raw)) for a in t.top_logprobs],
            )
            for t in chunk.scored
            if t.logprob is not None
        ]
    )


def _response_format(spec: ResponseFormatSpec | None) -> ResponseFormat | None:
    if spec is None or spec.type == "text":
        return None
    if spec.type == "json_schema":
        if spec.json_schema is None or spec.json_schema.schema is None:
            raise InvalidRequestError(
                "response_format.json_schema.schema is required for type json_schema",
                param="response_format",
            )
        check_schema(spec.json_schema.schema, "response_format.json_schema.schema")
        return ResponseFormat("json_schema", spec.json_schema.schema)
    if spec.schema is not None:
        check_schema(spec.schema, "response_format.schema")
        return ResponseFormat("json_schema", spec.schema)
    return ResponseFormat("json_object")


def usage_info(usage: Usage) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


async def collect(stream: ChunkStream) -> tuple[Chunk, UsageInfo]:
    """Run a job to the end: one chunk holding the whole text, its scored tokens and the finish reason."""
    parts: list[str] = []
    scored: list[Token] = []
    prompt: tuple[Token, ...] = ()
    last = Chunk("")
    async for chunk in stream:
        parts.append(chunk.text)
        scored += chunk.scored
        prompt = prompt or chunk.prompt_scored
        last = chunk
    assert last.usage is not None  # a finished job's last chunk always carries usage
    whole = Chunk("".join(parts), last.finish_reason, last.usage, last.stop_sequence, tuple(scored), prompt)
    return whole, usage_info(last.usage)


async def first_chunk(stream: ChunkStream) -> Chunk:
    """Wait for the job to start producing, so prompt errors still become plain HTTP errors."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return Chunk("", finish_reason="stop", usage=Usage(0, 0))
