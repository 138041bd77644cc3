"""Sampling for the MLX engine: mlx-lm's samplers and logits processors, per sequence.

Each request gets its own sampler (seeded per step where it asks for a seed) and logits processors
(logit bias, penalties, a thinking budget, and last the llguidance mask of its JSON grammar).
llguidance is a small Rust wheel (no torch, no CUDA) for macOS arm64 and Linux; its masks work
on any logits array, and its JSON-schema compiler is the one vLLM and llama.cpp also use.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from backends.base import PROMPT_SCORE_CHUNK, GenerationRequest, ResponseFormat, Token, TokenLogprob
from backends.reasoning import ThinkingBudget
from kernel.errors import EngineError, InvalidRequestError, engine_errors

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer

PENALTY_CONTEXT = 20  # tokens the repetition penalty looks back over (mlx-lm's default)

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
Sampler = Callable[[mx.array], mx.array]


def sampler(request: GenerationRequest) -> Sampler:
    """mlx-lm's sampler for the request, drawing from its own seed when it has one."""
    draw: Sampler = make_sampler(
        temp=request.temperature, top_p=request.top_p, min_p=request.min_p, top_k=request.top_k
    )
    seed = request.fixed_seed
    if seed is None or request.temperature == 0:
        return draw
    steps = itertools.count()

    def seeded(logprobs: mx.array) -> mx.array:
        # MLX has one global generator, and a batch samples every sequence from it in turn:
        # reseeding from (seed, step) makes a request's draws independent of its neighbours.
        mx.random.seed(hash((seed, next(steps))) % (1 << 63))
        return draw(logprobs)

    return seeded


def logits_processors(
    history: list[int], request: GenerationRequest, mask: GrammarMask | None
) -> list[LogitsProcessor]:
    """Logit bias, penalties (seeing `history`, the cached prompt tokens, too), then the grammar's mask."""
    processors: list[LogitsProcessor] = []
    penalized = request.repeat_penalty != 1.0 or request.presence_penalty or request.frequency_penalty
    if request.logit_bias:
        processors += make_logits_processors(logit_bias=dict(request.logit_bias))
    if penalized:
        penalties = make_logits_processors(
            repetition_penalty=request.repeat_penalty if request.repeat_penalty != 1.0 else None,
            repetition_context_size=PENALTY_CONTEXT,
            presence_penalty=request.presence_penalty or None,
            presence_context_size=PENALTY_CONTEXT,
            frequency_penalty=request.frequency_penalty or None,
            frequency_context_size=PENALTY_CONTEXT,
        )
        # generate_step only shows processors the uncached part of the prompt; give the
        # penalty the cached tail back so cached and uncached runs sample the same.
        tail = history[-PENALTY_CONTEXT:]
        processors += [_with_history(p, tail) for p in penalties] if tail else penalties
    if mask is not None:
        # Last, so no later processor can lift a masked token back above -inf.
        processors.append(mask)
    return processors


def _with_history(processor: LogitsProcessor, history: list[int]) -> LogitsProcessor:
    tail = mx.array(history)

    def run(tokens: mx.array, logits: mx.array) -> mx.array:
        return processor(mx.concatenate([tail, tokens]), logits)

    return run


class GrammarMask:
    """A logits processor that lets through only the tokens llguidance allows next."""

    def __init__(self, matcher: LLMatcher, vocab_size: int, eos: frozenset[int]) -> None:
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        self._fill = fill_next_token_bitmask
        self._matcher = matcher
        self._eos = eos
        self._started = False
        self._bitmask = allocate_token_bitmask(1, vocab_size)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._started:
            # generate_step calls us once per step, right after sampling the previous token.
            last = int(tokens[-1])
            if last in self._eos:
                return logits  # generation ends here; this step's result is discarded
            if not self._matcher.consume_token(last):
                raise EngineError(f"The JSON grammar rejected a token: {self._matcher.get_error()}")
        self._started = True
        self._fill(self._matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        # The model may have more logits than the tokenizer has tokens (padded embeddings).
        allowed = np.zeros(logits.shape[-1], dtype=np.bool_)
        n = min(len(bits), len(allowed))
        allowed[:n] = bits[:n].astype(np.bool_)
        return mx.where(mx.array(allowed), logits, -mx.inf)


class ThinkingForce:
    """Enforces a `ThinkingBudget`: once it is spent, only the close marker's next token is left
    possible, so the sampler picks it as if the model had (and the repetition history sees it)."""

    def __init__(self, budget: ThinkingBudget, tokenizer: Any) -> None:
        self._budget = budget
        self._tokenizer = tokenizer
        self._started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._started:  # called once per step, right after the previous token was sampled
            last = int(tokens[-1])
            self._budget.observe(str(self._tokenizer.decode([last], skip_special_tokens=False)))
        self._started = True
        forced = self._budget.forced()
        if forced is None:
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == forced, mx.zeros_like(logits), -mx.inf)


class TextStream:
    """Incremental detokenization that never emits half a UTF-8 character.

    Decodes a short window of recent tokens with and without the new one and emits the
    difference; seeding the window with the prompt tail keeps a leading space on the first token.
    """

    def __init__(self, tokenizer: Any, prompt: list[int]) -> None:
        self._tokenizer = tokenizer
        self._tokens = list(prompt[-4:])
        self._prefix = 0
        self._read = len(self._tokens)

    def _decode(self, tokens: list[int]) -> str:
        text = self._tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return str(text)

    def add(self, token: int, *, final: bool = False) -> str:
        self._tokens.append(token)
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self._tokens)
            return after[len(before) :]
        return ""


def score_prompt(
    model: Any, piece: Callable[[int], bytes], prompt: list[int], request: GenerationRequest
) -> tuple[Token, ...]:
    """Each prompt token's log-probability given the tokens before it (`echo` with `logprobs`): one
    forward pass over the whole prompt, apart from the generation's own (prefix-cached) one."""
    cache = make_prompt_cache(model)
    scored = [Token(piece(prompt[0]).decode("utf-8", errors="replace"))]
    for start in range(0, len(prompt) - 1, PROMPT_SCORE_CHUNK):  # bounded logits: chunk x vocabulary
        logits = model(mx.array(prompt[start : start + PROMPT_SCORE_CHUNK])[None], cache=cache)[0]
        logits = logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for i, token in enumerate(prompt[start + 1 : start + 1 + PROMPT_SCORE_CHUNK]):
            chosen, top = scores(piece, logprobs[i], token, request)
            scored.append(Token(chosen.token, logprob=chosen, top_logprobs=top))
    return tuple(scored)


def scores(
    piece: Callable[[int], bytes], logprobs: mx.array, token: int, request: GenerationRequest
) -> tuple[TokenLogprob, tuple[TokenLogprob, ...]]:
    """The chosen token's log-probability and the `top_logprobs` most likely ones (mlx-lm's
    distribution after the logits processors: penalties and a grammar's mask included);
    `piece`: a token's bytes (`GrammarCompiler.piece`)."""
    values = np.array(logprobs.astype(mx.float32)).reshape(-1)
    top: tuple[TokenLogprob, ...] = ()
    if request.top_logprobs:
        best = np.argpartition(-values, request.top_logprobs - 1)[: request.top_logprobs]
        best = best[np.argsort(-values[best])]
        top = tuple(TokenLogprob.of(piece(int(t)), float(values[t])) for t in best)
    return TokenLogprob.of(piece(token), float(values[token])), top


class GrammarCompiler:
    """`response_format` as llguidance matchers, on the model's tokenizer (converted on first use);
    also each token's bytes, which llguidance reads from the vocabulary."""

    def __init__(self, tokenizer: Any, eos: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self._eos = eos
        self._llg: LLTokenizer | None = None
        self._decode_bytes: Callable[[list[int]], bytes] | None = None

    def matcher(self, response_format: ResponseFormat) -> LLMatcher:
        """The request's JSON grammar, checked (a bad schema is a 400 before any token)."""
        try:
            from llguidance import LLMatcher
        except ImportError as exc:
            raise InvalidRequestError(
                "Structured output on the MLX engine needs llguidance (pip install 'llmservice[mlx]').",
                param="response_format",
            ) from exc
        # json_object = any object; a schema sent with it is honoured, as llama.cpp does.
        schema = response_format.schema if response_format.schema is not None else {"type": "object"}
        try:
            # Bounded whitespace: unbounded whitespace lets a weak model pad forever.
            grammar = LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_pattern": r"[ \n\t]{0,8}", "lenient": True}
            )
        except ValueError as exc:
            raise InvalidRequestError(f"Invalid JSON schema: {exc}", param="response_format") from exc
        matcher = LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"Unsupported JSON schema: {matcher.get_error()}", param="response_format")
        return matcher

    def piece(self, token: int) -> bytes:
        """A token's own bytes: the tokenizer's decode turns a byte token (part of a UTF-8
        character) into U+FFFD."""
        if self._decode_bytes is None:
            try:
                self._decode_bytes = self._llg_tokenizer().decode_bytes
            except (ImportError, InvalidRequestError):  # no llguidance or no fast tokenizer: the text's bytes
                self._decode_bytes = lambda tokens: str(self._tokenizer.decode(tokens)).encode()
        return self._decode_bytes([token])

    def mask(self, matcher: LLMatcher) -> GrammarMask:
        return GrammarMask(matcher, self._llg_tokenizer().vocab_size, self._eos)

    def _llg_tokenizer(self) -> LLTokenizer:
        if self._llg is None:
            from llguidance import LLTokenizer

            backend = getattr(self._tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise InvalidRequestError(
                    "Structured output needs a Hugging Face fast tokenizer; this model has none.",
                    param="response_format",
                )
            # Serialised without padding/truncation, as llguidance.hf.from_tokenizer does.
            backend = copy.copy(backend)
            backend.no_padding()
            backend.no_truncation()
            with engine_errors("mlx"):
                self._llg = LLTokenizer(backend.to_str(), eos_token=sorted(self._eos))
        return self._llg
