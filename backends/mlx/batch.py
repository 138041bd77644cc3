"""Continuous batching for the MLX engine, on mlx-lm's `BatchGenerator`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

from backends.base import DecodeBatch, DecodeState, GenerationRequest, Token
from backends.mlx.adapters import LoraAdapters
from backends.mlx.prefix_cache import PrefixCache
from backends.mlx.sampling import (
    GrammarCompiler,
    LogitsProcessor,
    TextStream,
    ThinkingForce,
    logits_processors,
    sampler,
    score_prompt,
    scores,
)
from backends.mlx.speculative import ModelDrafter, SpecDecoder, SpecStats, eligible
from backends.reasoning import ThinkingBudget
from kernel.errors import AdapterNotFoundError, LLMServiceError, engine_errors

if TYPE_CHECKING:
    from llguidance import LLMatcher

    from backends.mlx.vision import VisionLanguageModel

ENGINE = "mlx"  # how engine_errors names the library


@dataclass(frozen=True, slots=True)
class ModelHandle:
    """What decoding needs of the loaded model: its modules, tokenizer, caches and helpers.

    The backend hands this over rather than itself, so the batch never reaches back into its owner.
    """

    model: Any  # the base model's modules
    tokenizer: Any  # mlx_lm TokenizerWrapper (untyped)
    prefix_cache: PrefixCache  # the base model's
    adapters: LoraAdapters
    grammars: GrammarCompiler
    eos: frozenset[int]
    max_batch: int
    prefill_step: int  # prompt tokens per forward pass (N_BATCH)
    thinking_budget: Callable[[Sequence[int], GenerationRequest], ThinkingBudget | None]
    speculative: str = "off"  # the tier's SPECULATIVE: `ngram` drafts by prompt lookup, `draft` with draft_model
    draft_tokens: int = 8  # most tokens drafted per forward
    spec_stats: SpecStats = field(default_factory=SpecStats)  # the backend's, so counts outlive a batch
    vision: VisionLanguageModel | None = None  # a vision-language model's images side (mlx-vlm)
    draft_model: Any = None  # SPECULATIVE=draft: the draft model's modules (its vocabulary checked at load)

    def model_for(self, adapter: str | None) -> tuple[Any, PrefixCache]:
        """The modules a request runs on and the prefix cache of KV they computed (an adapter
        changes every K and V, so KV is reused only within one adapter)."""
        if adapter is None:
            return self.model, self.prefix_cache
        found = self.adapters.get(adapter)
        if found is None:
            raise AdapterNotFoundError(adapter, "this model", self.adapters.names())
        return found

    def fetch(self, model: Any, prefix_cache: PrefixCache, prompt: list[int], request: GenerationRequest) -> _Start:
        """The prefix cache's best entry for the prompt, then the prompt's images run into it: decoding
        goes on from `start` with plain tokens. An image prompt is keyed by its images' digests."""
        if self.vision is None or not request.images:
            cache, reused = prefix_cache.fetch(prompt)
            if self.vision is not None:
                self.vision.text_only(cache)
            return _Start(cache, reused, reused, None)
        keyed = self.vision.cache_key(prompt, request.images)
        cache, reused = prefix_cache.fetch(keyed)
        if cache is None:
            cache = make_prompt_cache(model)
        start = self.vision.prefill(model, prompt, request.images, cache, reused, self.prefill_step)
        return _Start(cache, reused, start, keyed)

    def processors(
        self, history: list[int], request: GenerationRequest, prompt: list[int], matcher: LLMatcher | None
    ) -> list[LogitsProcessor]:
        """The request's logits processors (`history`: the cached prompt tokens the penalties see),
        with its thinking budget's where it has one to enforce."""
        processors = logits_processors(history, request, self.grammars.mask(matcher) if matcher is not None else None)
        budget = self.thinking_budget(prompt, request)
        return processors if budget is None else [*processors, ThinkingForce(budget, self.tokenizer)]


@dataclass(frozen=True, slots=True)
class _Start:
    """Where a sequence starts decoding: its cache, the prompt tokens the prefix cache gave (`reused`,
    reported as cached), those the cache holds now (`start`), and its cache key if images change it."""

    cache: list[Any] | None
    reused: int
    start: int
    keyed: list[int] | None

    def key(self, tokens: Sequence[int]) -> list[int]:
        """The prefix-cache key of `tokens` (the prompt, then what followed it)."""
        return cache_key(self.keyed, tokens)


def cache_key(keyed: list[int] | None, tokens: Sequence[int]) -> list[int]:
    """`tokens` (a prompt, then what followed it) as the prefix cache keys them: the prompt's part as
    `keyed` where images changed it."""
    if keyed is None:
        return list(tokens)
    n = min(len(keyed), len(tokens))
    return [*keyed[:n], *tokens[n:]]


@dataclass(slots=True)
class _Sequence:
    """A request inside an `MlxBatch`."""

    key: int
    reused: int  # prompt tokens taken from the prefix cache
    text: TextStream
    matcher: LLMatcher | None
    request: GenerationRequest
    keyed: list[int] | None  # the prompt's prefix-cache key where images change it (never the cache: it is the batch's)
    count: int = 0
    prompt: tuple[Token, ...] = ()  # the prompt's scores, with prompt_logprobs
    spec: SpecDecoder | None = None  # decoding speculatively, outside the BatchGenerator


class MlxBatch(DecodeBatch):
    """Continuous batching on mlx-lm's `BatchGenerator`, with our prefix cache around it.

    A sequence starts from the prefix cache's best entry (BatchGenerator merges per-sequence
    caches, left-padding the shorter ones) and its cache goes back to the prefix cache when it
    ends or is removed, exactly as on the single-request path. Each sequence has its own sampler
    and logits processors (repetition penalty, the llguidance mask); BatchGenerator hands each
    processor the sequence's whole token history, so no cached-tail adapter is needed here.
    """

    def __init__(self, handle: ModelHandle) -> None:
        self._handle = handle
        self._tokenizer = handle.tokenizer
        # One BatchGenerator per adapter (None: the base model): a LoRA adapter is its own set of
        # modules, so requests of one adapter decode together and each group steps in turn.
        self._gens: dict[str | None, Any] = {}
        self._sequences: dict[tuple[str | None, int], _Sequence] = {}  # by (adapter, generator uid)
        self._uids: dict[int, tuple[str | None, int]] = {}  # our key -> (adapter, uid)
        self._specs: dict[int, _Sequence] = {}  # speculating sequences, by our key

    @property
    def live(self) -> int:
        """Sequences still decoding."""
        return len(self._specs) + len(self._uids)

    def _gen(self, adapter: str | None) -> Any:
        gen = self._gens.get(adapter)
        if gen is None:
            handle, size = self._handle, self._handle.max_batch
            gen = self._gens[adapter] = BatchGenerator(  # untyped
                handle.model_for(adapter)[0],
                stop_tokens=[[t] for t in sorted(handle.eos)],
                completion_batch_size=size,
                prefill_batch_size=size,
                prefill_step_size=handle.prefill_step,
            )
        return gen

    def add(self, key: int, state: DecodeState) -> None:
        handle, prompt, request = self._handle, state.prompt, state.request
        model, prefix_cache = handle.model_for(request.adapter)
        matcher = handle.grammars.matcher(request.response_format) if request.response_format else None
        with engine_errors(ENGINE):
            begin = handle.fetch(model, prefix_cache, prompt, request)
        cache, reused, start = begin.cache, begin.reused, begin.start
        processors = handle.processors([], request, prompt, matcher)
        seq = _Sequence(key, reused, TextStream(self._tokenizer, prompt), matcher, request, begin.keyed)
        if request.prompt_logprobs:
            seq.prompt = score_prompt(model, handle.grammars.piece, prompt, request)
        if handle.speculative != "off" and eligible(request, processors, matcher is not None):
            drafter = None if handle.draft_model is None else ModelDrafter(handle.draft_model, handle.prefill_step)
            seq.spec = SpecDecoder(
                model,
                prompt,
                cache,
                start,
                handle.draft_tokens,
                handle.eos,
                state.max_tokens,
                handle.prefill_step,
                handle.spec_stats,
                None if request.temperature == 0 else sampler(request),  # greedy: one argmax for all positions
                drafter,
            )
            self._specs[key] = seq
            return
        with engine_errors(ENGINE):
            (uid,) = self._gen(request.adapter).insert(
                [prompt[start:]],
                max_tokens=[state.max_tokens],
                caches=[cache],  # None: BatchGenerator makes a fresh one
                all_tokens=[prompt[:start]],
                samplers=[sampler(request)],
                logits_processors=[processors],
            )
        self._sequences[request.adapter, uid] = seq
        self._uids[key] = (request.adapter, uid)

    def step(self) -> list[tuple[int, Token | LLMServiceError | None]]:
        out: list[tuple[int, Token | LLMServiceError | None]] = []
        for adapter in {adapter for adapter, _ in self._sequences}:
            with engine_errors(ENGINE):
                _, responses = self._gens[adapter].next()
            for r in responses:
                seq = self._sequences.get((adapter, r.uid))
                if seq is None:
                    continue
                out.append((seq.key, self._token(seq, int(r.token), r.finish_reason, r.logprobs)))
                if r.finish_reason is not None:
                    # Like generate_step, the batch fed this token to the model before returning it:
                    # the cache holds the prompt and every token returned, EOS included.
                    self._forget(adapter, r.uid, r.all_tokens, r.prompt_cache)
        for key, seq in list(self._specs.items()):
            spec = seq.spec
            assert spec is not None
            with engine_errors(ENGINE):
                token = spec.next()
            if token is None:  # a prompt chunk went in
                continue
            finish = None
            if spec.ended and not spec.ready:
                finish = "stop" if token in self._handle.eos else "length"
            out.append((key, self._token(seq, token, finish, None)))
            if finish is not None:
                self._forget_spec(key)
        return out

    def _token(self, seq: _Sequence, token: int, finish: str | None, logprobs: Any) -> Token | None:
        if finish == "stop":  # an end-of-generation token: neither shown nor counted
            return None
        seq.count += 1
        final = seq.matcher is not None and seq.matcher.is_stopped()
        text = seq.text.add(token, final=final or finish == "length")
        request = seq.request
        piece = self._handle.grammars.piece
        scored = scores(piece, logprobs, token, request) if request.logprobs else (None, ())
        first = seq.count == 1
        return Token(text, seq.reused if first else 0, final, scored[0], scored[1], seq.prompt if first else ())

    def remove(self, key: int) -> None:
        if key in self._specs:
            self._forget_spec(key)
            return
        found = self._uids.get(key)
        if found is None:
            return
        adapter, uid = found
        with engine_errors(ENGINE):
            caches = self._gens[adapter].remove([uid], return_prompt_caches=True)
        cache, tokens = caches.get(uid, (None, None))
        self._forget(adapter, uid, tokens, cache)

    def _forget(self, adapter: str | None, uid: int, tokens: list[int] | None, cache: list[Any] | None) -> None:
        seq = self._sequences.pop((adapter, uid))
        del self._uids[seq.key]
        if tokens and cache is not None and (adapter is None or adapter in self._handle.adapters.names()):
            self._handle.model_for(adapter)[1].store(cache_key(seq.keyed, tokens), cache)

    def _forget_spec(self, key: int) -> None:
        seq = self._specs.pop(key)
        spec, adapter = seq.spec, seq.request.adapter
        assert spec is not None and spec.cache is not None
        if spec.fed and (adapter is None or adapter in self._handle.adapters.names()):
            self._handle.model_for(adapter)[1].store(cache_key(seq.keyed, spec.cached_tokens), spec.cache)

    def close(self) -> None:
        self._specs.clear()
        self._sequences.clear()
        self._uids.clear()
        for gen in self._gens.values():
            gen.close()
        self._gens.clear()
