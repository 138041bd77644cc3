"""The MLX generation engine (mlx-lm): fast on Apple Silicon, correct (and slow) on Linux CPU.

Beyond plain generation it keeps a small prefix cache of KV states, so a multi-turn chat, which
re-sends the whole history, only runs the new tokens through the model; it enforces
`response_format` with llguidance, which masks the logits to tokens the JSON grammar allows; and
it decodes concurrent requests together with mlx-lm's `BatchGenerator` (continuous batching), with
the prefix cache, the grammar, sampling options and seeds all working per sequence in the batch.
llguidance is a small Rust wheel (no torch, no CUDA) for macOS arm64 and Linux; its masks work
on any logits array, and its JSON-schema compiler is the one vLLM and llama.cpp also use.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from jinja2 import TemplateError
from mlx_lm import load as mlx_load
from mlx_lm.generate import BatchGenerator, generate_step, wired_limit
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import _download, load_model

from backends.base import (
    PROMPT_SCORE_CHUNK,
    RESERVED_TEMPLATE_NAMES,
    AdapterInfo,
    Backend,
    Completion,
    DecodeBatch,
    EngineInfo,
    GenerationRequest,
    ResponseFormat,
    Token,
    TokenLogprob,
    common_prefix,
)
from backends.reasoning import ReasoningFormat, ThinkingBudget
from backends.tools import fold_tools, template_messages, template_takes_tools, tool_format
from kernel.errors import (
    AdapterNotFoundError,
    EngineError,
    InvalidRequestError,
    LLMServiceError,
    ModelUnavailableError,
    engine_errors,
)

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer

    from kernel.config import TierSettings

log = logging.getLogger(__name__)

_ENGINE = "mlx"
_PENALTY_CONTEXT = 20  # tokens the repetition penalty looks back over (mlx-lm's default)

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
Sampler = Callable[[mx.array], mx.array]


class MlxBackend(Backend):
    """An mlx-lm model folder or hub repo id. Not thread-safe: one worker per instance."""

    name = "mlx"

    def __init__(self, tier: TierSettings, model_path: str) -> None:
        self.tier = tier
        self.model_path = model_path
        self._model: Any = None
        self._tokenizer: Any = None  # mlx_lm TokenizerWrapper (untyped)
        self._eos: frozenset[int] = frozenset()
        self._reasoning: ReasoningFormat | None = None
        self._grammar_tokenizer: LLTokenizer | None = None  # built on first structured request
        entries = tier.prefix_cache_entries
        self.prefix_cache = PrefixCache(entries)
        self._adapters: dict[str, _Adapter] = {}
        self._local = Path(model_path)  # the model folder, once load() resolved it

    # -- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        if self._model is not None:
            return
        where = f"Tier {self.tier.name or '?'}: cannot load MLX model {self.model_path!r}"
        source = self.model_path
        if source.startswith(("/", ".", "~")) or source.count("/") > 1:
            # A local path: say so plainly instead of letting it be tried as a hub repo id.
            local = Path(source).expanduser()
            if not local.is_dir():
                raise ModelUnavailableError(f"{where}: no such folder")
            source = str(local)
        try:
            self._local = _download(source)  # the folder (a hub id resolves to its cached copy)
            model, tokenizer = mlx_load(str(self._local))[:2]
        except Exception as exc:
            # Loading fails in many library-specific ways (missing files, hub errors, unknown
            # architectures); to a client they all mean "this model cannot be served".
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelUnavailableError(f"{where}: {reason}") from exc
        eos = set(tokenizer.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self._model, self._tokenizer, self._eos = model, tokenizer, frozenset(eos)
        self._reasoning = self.probe_reasoning(self._template_source(), self.tier.reasoning_parser)
        # BatchGenerator merges per-sequence caches; models whose caches cannot merge (some
        # state-space layers) decode one request at a time, as mlx_lm.server does.
        batchable = all(hasattr(c, "merge") for c in make_prompt_cache(model))
        self.max_batch_size = self.tier.max_batch if batchable else 1
        if not batchable and self.tier.max_batch > 1:
            log.info("Tier %s: this model's KV cache cannot be batched; one request at a time", self.tier.name)

    def close(self) -> None:
        self.prefix_cache.clear()
        self._adapters.clear()
        self._model = self._tokenizer = self._grammar_tokenizer = None
        mx.clear_cache()

    def reset_prefix_cache(self) -> None:
        self.prefix_cache.clear()
        for adapter in self._adapters.values():
            adapter.prefix_cache.clear()

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine=_ENGINE,
            device=mx.default_device().type.name,
            context_length=self.tier.n_ctx,
            extras={
                "model_path": self.model_path,
                "prefix_cache_entries": self.prefix_cache.capacity,
                "structured_output": "llguidance",
                "max_batch": self.max_batch_size,
            },
            vocab_size=self._tokenizer.vocab_size if self._tokenizer is not None else 0,
            tool_format=tool_format(self._template_source(), self.tier.tool_parser),
            reasoning=self._reasoning,
        )

    def _template_source(self) -> str | None:
        template = self.tier.chat_template
        return template or (getattr(self._tokenizer, "chat_template", None) if self._tokenizer else None)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every token that ends generation (config.json and generation_config.json)."""
        return self._eos

    # -- prompts ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        tokenizer = self._require()[1]
        bos = tokenizer.bos_token
        add_special = bos is None or not text.startswith(bos)
        with engine_errors(_ENGINE):
            return [int(t) for t in tokenizer.encode(text, add_special_tokens=add_special)]

    def detokenize(self, tokens: Sequence[int]) -> str:
        tokenizer = self._require()[1]
        with engine_errors(_ENGINE):
            return str(tokenizer.decode(list(tokens), skip_special_tokens=False))

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        tokenizer = self._require()[1]
        template = self.tier.chat_template
        if template is None and not tokenizer.chat_template:
            raise InvalidRequestError(
                f"The model {self.model_path!r} has no chat template and none is configured "
                f"(set {(self.tier.name or 'TIER').upper()}_CHAT_TEMPLATE), so chat messages "
                "cannot be formatted; use /v1/completions with a raw prompt instead.",
                param="messages",
            )
        extra = {k: v for k, v in (variables or {}).items() if k not in RESERVED_TEMPLATE_NAMES}
        if template is not None:
            extra["chat_template"] = template
        if not template_takes_tools(self._template_source()):
            messages, tools = fold_tools(messages, tools or ()), None
        if tools:
            extra["tools"] = list(tools)
        # mlx-lm's wrapper sets `enable_thinking` to whether the vocabulary has thinking tokens when
        # the request leaves it unset; the template's own default is what an unset switch means
        # here (as on llama.cpp), so a plain Hugging Face tokenizer renders without the wrapper.
        render = tokenizer.apply_chat_template
        hf = getattr(tokenizer, "_tokenizer", None)
        if getattr(tokenizer, "_chat_template", None) is None and hf is not None:
            render, extra["return_dict"] = hf.apply_chat_template, False
        try:
            with engine_errors(_ENGINE):
                text = render(template_messages(messages), add_generation_prompt=True, tokenize=False, **extra)
        except TemplateError as exc:
            # Templates reject bad conversations themselves (e.g. roles that do not alternate).
            message = f"The chat template rejected the messages: {exc}"
            raise InvalidRequestError(message, param="messages") from exc
        return str(text)

    # -- LoRA adapters ---------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """An mlx-lm adapter folder (adapter_config.json + adapters.safetensors) on a second instance
        of the model's modules that shares the base weights: only the LoRA matrices are new memory.
        Requests name it; those of one adapter decode together (see `_MlxBatch`)."""
        base = self._require()[0]
        folder = Path(path)
        config_file, weights_file = folder / "adapter_config.json", folder / "adapters.safetensors"
        if not (config_file.is_file() and weights_file.is_file()):
            raise InvalidRequestError(
                f"{path} is not an MLX adapter folder (adapter_config.json and adapters.safetensors)", param="adapter"
            )
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"{config_file}: not readable JSON ({exc})", param="adapter") from exc
        kind = config.get("fine_tune_type", "lora") if isinstance(config, dict) else None
        if kind not in ("lora", "dora"):
            raise InvalidRequestError(f"{path}: fine_tune_type {kind!r} is not a LoRA adapter", param="adapter")
        try:
            model, _ = load_model(self._local, lazy=True)  # lazy: its own weights are never read
            model.update(base.parameters())  # the base model's arrays, shared
            load_adapters(model, str(folder))
            model.eval()
            mx.eval(model.parameters())
        except Exception as exc:
            # Shapes that do not fit this model, missing tensors, bad files: all "not for this model".
            raise InvalidRequestError(f"{path}: cannot be applied to this model: {exc}", param="adapter") from exc
        lora = config.get("lora_parameters")
        rank = lora.get("rank") if isinstance(lora, dict) else None
        info = AdapterInfo(
            name,
            str(folder),
            config_file.stat().st_size + weights_file.stat().st_size,
            rank if isinstance(rank, int) else None,
        )
        self._adapters[name] = _Adapter(model, PrefixCache(self.tier.prefix_cache_entries), info)
        return info

    def unload_adapter(self, name: str) -> None:
        self._adapters.pop(name, None)

    def adapter_names(self) -> list[str]:
        return list(self._adapters)

    def _model_for(self, adapter: str | None) -> tuple[Any, PrefixCache]:
        """The modules a request runs on and the prefix cache of KV they computed (an adapter
        changes every K and V, so KV is reused only within one adapter)."""
        if adapter is None:
            return self._require()[0], self.prefix_cache
        found = self._adapters.get(adapter)
        if found is None:
            raise AdapterNotFoundError(adapter, "this model", list(self._adapters))
        return found.model, found.prefix_cache

    # -- generation ------------------------------------------------------------------------

    def decode(
        self, prompt: list[int], request: GenerationRequest, max_tokens: int, cancel: threading.Event | None = None
    ) -> Iterator[Token]:
        tokenizer = self._require()[1]
        model, prefix_cache = self._model_for(request.adapter)
        # Checked before the first token, so a bad schema is a 400 and not a broken stream.
        matcher = self._matcher(request.response_format) if request.response_format else None
        return self._generate(model, prefix_cache, tokenizer, list(prompt), request, max_tokens, matcher, cancel)

    def open_batch(self) -> DecodeBatch:
        return _MlxBatch(self)

    def _generate(
        self,
        model: Any,
        prefix_cache: PrefixCache,
        tokenizer: Any,
        prompt: list[int],
        request: GenerationRequest,
        max_tokens: int,
        matcher: LLMatcher | None,
        cancel: threading.Event | None,
    ) -> Iterator[Token]:
        if max_tokens <= 0:
            return
        cache, reused = prefix_cache.fetch(prompt)
        if cache is None:
            cache = make_prompt_cache(model)
        processors = self._processors(prompt[:reused], request, matcher)
        processors += self._thinking(prompt, request)
        scored_prompt = _score_prompt(model, tokenizer, prompt, request) if request.prompt_logprobs else ()
        text = _TextStream(tokenizer, prompt)
        generated: list[int] = []
        eos: list[int] = []  # the end-of-generation token, once the model emits it
        prefilled = [0]  # prompt tokens after the reused ones that are in the cache so far
        kept: list[int] | None = None  # the tokens the cache holds, when it is worth keeping

        def on_prefill(done: int, total: int) -> None:
            if done < total:  # the last call comes after the first token: the loop handles that
                prefilled[0] = done
                if cancel is not None and cancel.is_set():
                    raise _Cancelled

        with engine_errors(_ENGINE), wired_limit(model):
            steps = generate_step(
                mx.array(prompt[reused:]),
                model,
                max_tokens=max_tokens,
                sampler=_sampler(request),
                logits_processors=processors,
                prompt_cache=cache,
                prefill_step_size=self.tier.n_batch,
                prompt_progress_callback=on_prefill,
            )
            try:
                for step, logprobs in steps:
                    token = int(step)  # annotated as an array; generate_step yields a plain int
                    if token in self._eos:
                        eos.append(token)
                        break
                    generated.append(token)
                    final = matcher is not None and matcher.is_stopped()
                    done = len(generated) == max_tokens or final
                    first = len(generated) == 1
                    chosen, top = _scores(tokenizer, logprobs, token, request) if request.logprobs else (None, ())
                    yield Token(
                        text.add(token, final=done),
                        cached_tokens=reused if first else 0,
                        final=final,
                        logprob=chosen,
                        top_logprobs=top,
                        prompt=scored_prompt if first else (),
                    )
                    if done:
                        break
                # generate_step feeds each token to the model before yielding it, so the
                # cache now holds the prompt, every yielded token and the EOS if we saw it.
                kept = prompt + generated + eos
            except GeneratorExit:
                kept = prompt + generated + eos  # the client went away; the cache is consistent
                raise
            except _Cancelled:
                kept = prompt[: reused + prefilled[0]]  # cancelled mid-prompt: a retry resumes here
            finally:
                steps.close()
                if kept is not None:
                    prefix_cache.store(kept, cache)

    def _processors(
        self, history: list[int], request: GenerationRequest, matcher: LLMatcher | None
    ) -> list[LogitsProcessor]:
        processors: list[LogitsProcessor] = []
        penalized = request.repeat_penalty != 1.0 or request.presence_penalty or request.frequency_penalty
        if request.logit_bias:
            processors += make_logits_processors(logit_bias=dict(request.logit_bias))
        if penalized:
            penalties = make_logits_processors(
                repetition_penalty=request.repeat_penalty if request.repeat_penalty != 1.0 else None,
                repetition_context_size=_PENALTY_CONTEXT,
                presence_penalty=request.presence_penalty or None,
                presence_context_size=_PENALTY_CONTEXT,
                frequency_penalty=request.frequency_penalty or None,
                frequency_context_size=_PENALTY_CONTEXT,
            )
            # generate_step only shows processors the uncached part of the prompt; give the
            # penalty the cached tail back so cached and uncached runs sample the same.
            tail = history[-_PENALTY_CONTEXT:]
            processors += [_with_history(p, tail) for p in penalties] if tail else penalties
        if matcher is not None:
            # Last, so no later processor can lift a masked token back above -inf.
            processors.append(_GrammarMask(matcher, self._llg_tokenizer().vocab_size, self._eos))
        return processors

    def _thinking(self, prompt: list[int], request: GenerationRequest) -> list[LogitsProcessor]:
        """The thinking budget's processor, where the request has one to enforce."""
        budget = self.thinking_budget(prompt, request)
        return [] if budget is None else [_ThinkingForce(budget, self._require()[1])]

    def _matcher(self, response_format: ResponseFormat) -> LLMatcher:
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

    def _llg_tokenizer(self) -> LLTokenizer:
        if self._grammar_tokenizer is None:
            from llguidance import LLTokenizer

            backend = getattr(self._require()[1], "backend_tokenizer", None)
            if backend is None:
                raise InvalidRequestError(
                    "Structured output needs a Hugging Face fast tokenizer; this model has none.",
                    param="response_format",
                )
            # Serialised without padding/truncation, as llguidance.hf.from_tokenizer does.
            backend = copy.copy(backend)
            backend.no_padding()
            backend.no_truncation()
            with engine_errors(_ENGINE):
                self._grammar_tokenizer = LLTokenizer(backend.to_str(), eos_token=sorted(self._eos))
        return self._grammar_tokenizer

    def _require(self) -> tuple[Any, Any]:
        if self._model is None:
            raise ModelUnavailableError(f"The MLX model {self.model_path!r} is not loaded.")
        return self._model, self._tokenizer


class _Cancelled(Exception):
    """Raised from the prompt-progress callback once the request's cancel event is set."""


def _sampler(request: GenerationRequest) -> Sampler:
    sampler: Sampler = make_sampler(
        temp=request.temperature, top_p=request.top_p, min_p=request.min_p, top_k=request.top_k
    )
    seed = request.seed
    if seed is None or request.temperature == 0:
        return sampler
    steps = itertools.count()

    def seeded(logprobs: mx.array) -> mx.array:
        # MLX has one global generator, and a batch samples every sequence from it in turn:
        # reseeding from (seed, step) makes a request's draws independent of its neighbours.
        mx.random.seed(hash((seed, next(steps))) % (1 << 63))
        return sampler(logprobs)

    return seeded


@dataclass(slots=True)
class _Sequence:
    """A request inside an `_MlxBatch`."""

    key: int
    reused: int  # prompt tokens taken from the prefix cache
    text: _TextStream
    matcher: LLMatcher | None
    request: GenerationRequest
    count: int = 0
    prompt: tuple[Token, ...] = ()  # the prompt's scores, with prompt_logprobs


class _MlxBatch(DecodeBatch):
    """Continuous batching on mlx-lm's `BatchGenerator`, with our prefix cache around it.

    A sequence starts from the prefix cache's best entry (BatchGenerator merges per-sequence
    caches, left-padding the shorter ones) and its cache goes back to the prefix cache when it
    ends or is removed, exactly as on the single-request path. Each sequence has its own sampler
    and logits processors (repetition penalty, the llguidance mask); BatchGenerator hands each
    processor the sequence's whole token history, so no cached-tail adapter is needed here.
    """

    def __init__(self, backend: MlxBackend) -> None:
        self._backend = backend
        self._tokenizer = backend._require()[1]
        # One BatchGenerator per adapter (None: the base model): a LoRA adapter is its own set of
        # modules, so requests of one adapter decode together and each group steps in turn.
        self._gens: dict[str | None, Any] = {}
        self._sequences: dict[tuple[str | None, int], _Sequence] = {}  # by (adapter, generator uid)
        self._uids: dict[int, tuple[str | None, int]] = {}  # our key -> (adapter, uid)

    def _gen(self, adapter: str | None) -> Any:
        gen = self._gens.get(adapter)
        if gen is None:
            backend, size = self._backend, self._backend.max_batch_size
            gen = self._gens[adapter] = BatchGenerator(  # untyped
                backend._model_for(adapter)[0],
                stop_tokens=[[t] for t in sorted(backend.eos_token_ids)],
                completion_batch_size=size,
                prefill_batch_size=size,
                prefill_step_size=backend.tier.n_batch,
            )
        return gen

    def add(self, key: int, completion: Completion) -> None:
        backend, prompt, request = self._backend, completion.prompt, completion.request
        model, prefix_cache = backend._model_for(request.adapter)
        matcher = backend._matcher(request.response_format) if request.response_format else None
        cache, reused = prefix_cache.fetch(prompt)
        with engine_errors(_ENGINE):
            (uid,) = self._gen(request.adapter).insert(
                [prompt[reused:]],
                max_tokens=[completion.max_tokens],
                caches=[cache],  # None: BatchGenerator makes a fresh one
                all_tokens=[prompt[:reused]],
                samplers=[_sampler(request)],
                logits_processors=[backend._processors([], request, matcher) + backend._thinking(prompt, request)],
            )
        seq = _Sequence(key, reused, _TextStream(self._tokenizer, prompt), matcher, request)
        if request.prompt_logprobs:
            seq.prompt = _score_prompt(model, self._tokenizer, prompt, request)
        self._sequences[request.adapter, uid] = seq
        self._uids[key] = (request.adapter, uid)

    def step(self) -> list[tuple[int, Token | LLMServiceError | None]]:
        out: list[tuple[int, Token | LLMServiceError | None]] = []
        for adapter in {adapter for adapter, _ in self._sequences}:
            with engine_errors(_ENGINE):
                _, responses = self._gens[adapter].next()
            for r in responses:
                seq = self._sequences.get((adapter, r.uid))
                if seq is None:
                    continue
                out.append((seq.key, self._token(seq, r)))
                if r.finish_reason is not None:
                    # Like generate_step, the batch fed this token to the model before returning it:
                    # the cache holds the prompt and every token returned, EOS included.
                    self._forget(adapter, r.uid, r.all_tokens, r.prompt_cache)
        return out

    def _token(self, seq: _Sequence, r: Any) -> Token | None:
        if r.finish_reason == "stop":  # an end-of-generation token: neither shown nor counted
            return None
        seq.count += 1
        final = seq.matcher is not None and seq.matcher.is_stopped()
        text = seq.text.add(int(r.token), final=final or r.finish_reason == "length")
        request = seq.request
        scored = _scores(self._tokenizer, r.logprobs, int(r.token), request) if request.logprobs else (None, ())
        first = seq.count == 1
        return Token(text, seq.reused if first else 0, final, scored[0], scored[1], seq.prompt if first else ())

    def remove(self, key: int) -> None:
        found = self._uids.get(key)
        if found is None:
            return
        adapter, uid = found
        with engine_errors(_ENGINE):
            caches = self._gens[adapter].remove([uid], return_prompt_caches=True)
        cache, tokens = caches.get(uid, (None, None))
        self._forget(adapter, uid, tokens, cache)

    def _forget(self, adapter: str | None, uid: int, tokens: list[int] | None, cache: list[Any] | None) -> None:
        seq = self._sequences.pop((adapter, uid))
        del self._uids[seq.key]
        if tokens and cache is not None and (adapter is None or adapter in self._backend.adapter_names()):
            self._backend._model_for(adapter)[1].store(list(tokens), cache)

    def close(self) -> None:
        self._sequences.clear()
        self._uids.clear()
        for gen in self._gens.values():
            gen.close()
        self._gens.clear()


@dataclass(slots=True)
class _Adapter:
    model: Any  # the model's modules with LoRA layers, sharing the base weights
    prefix_cache: PrefixCache
    info: AdapterInfo


@dataclass(slots=True)
class _Entry:
    tokens: list[int]
    cache: list[Any]


class PrefixCache:
    """The KV caches of the last few sequences (prompt + generated), reused by longest prefix.

    Multi-turn chat re-sends the whole history: the previous turn's cache covers most of it.
    A cache whose tokens are a prefix of the new prompt is taken and extended in place (the new
    sequence supersedes it); one that diverges is copied and trimmed back to the shared part.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: list[_Entry] = []  # oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def sequences(self) -> list[list[int]]:
        """The token sequences held, oldest first (copies; for stats and tests)."""
        return [list(e.tokens) for e in self._entries]

    def fetch(self, prompt: Sequence[int]) -> tuple[list[Any] | None, int]:
        """Return (a cache holding the first n prompt tokens, n), or (None, 0)."""
        best: tuple[int, int] | None = None  # (reusable tokens, entry index)
        for i, entry in enumerate(self._entries):
            shared = common_prefix(entry.tokens, prompt)
            # At least one prompt token must still run through the model to give logits.
            usable = min(shared, len(prompt) - 1)
            extends = usable == len(entry.tokens)
            if usable > 0 and (extends or can_trim_prompt_cache(entry.cache)) and (best is None or usable > best[0]):
                best = (usable, i)
        if best is None:
            return None, 0
        usable, i = best
        entry = self._entries[i]
        if usable == len(entry.tokens):
            del self._entries[i]
            return entry.cache, usable
        self._entries.append(self._entries.pop(i))  # most recently used
        cache = copy.deepcopy(entry.cache)
        trim_prompt_cache(cache, len(entry.tokens) - usable)
        return cache, usable

    def store(self, tokens: list[int], cache: list[Any]) -> None:
        if self.capacity <= 0 or not tokens:
            return
        size = _cache_offset(cache)
        if size is not None and size != len(tokens):
            # Should not happen; never keep a cache whose contents we cannot name.
            if size < len(tokens) or not can_trim_prompt_cache(cache):
                return
            trim_prompt_cache(cache, size - len(tokens))
        if can_trim_prompt_cache(cache):
            # A trimmable cache can stand in for any of its prefixes: drop those.
            self._entries = [e for e in self._entries if tokens[: len(e.tokens)] != e.tokens]
        else:
            self._entries = [e for e in self._entries if e.tokens != tokens]
        self._entries.append(_Entry(tokens, cache))
        del self._entries[: -self.capacity]


class _GrammarMask:
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


class _ThinkingForce:
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


class _TextStream:
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


def _with_history(processor: LogitsProcessor, history: list[int]) -> LogitsProcessor:
    tail = mx.array(history)

    def run(tokens: mx.array, logits: mx.array) -> mx.array:
        return processor(mx.concatenate([tail, tokens]), logits)

    return run


def _cache_offset(cache: list[Any]) -> int | None:
    """Tokens held by a KV-style cache, or None for caches that do not count them (SSM state)."""
    for layer in cache:
        offset = getattr(layer, "offset", None)
        if isinstance(offset, int):
            return offset
    return None


def _score_prompt(model: Any, tokenizer: Any, prompt: list[int], request: GenerationRequest) -> tuple[Token, ...]:
    """Each prompt token's log-probability given the tokens before it (`echo` with `logprobs`): one
    forward pass over the whole prompt, apart from the generation's own (prefix-cached) one."""
    cache = make_prompt_cache(model)
    scored = [Token(tokenizer.decode([prompt[0]]))]
    for start in range(0, len(prompt) - 1, PROMPT_SCORE_CHUNK):  # bounded logits: chunk x vocabulary
        logits = model(mx.array(prompt[start : start + PROMPT_SCORE_CHUNK])[None], cache=cache)[0]
        logits = logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for i, token in enumerate(prompt[start + 1 : start + 1 + PROMPT_SCORE_CHUNK]):
            chosen, top = _scores(tokenizer, logprobs[i], token, request)
            scored.append(Token(chosen.token, logprob=chosen, top_logprobs=top))
    return tuple(scored)


def _scores(
    tokenizer: Any, logprobs: mx.array, token: int, request: GenerationRequest
) -> tuple[TokenLogprob, tuple[TokenLogprob, ...]]:
    """The chosen token's log-probability and the `top_logprobs` most likely ones (mlx-lm's
    distribution after the logits processors: penalties and a grammar's mask included)."""
    values = np.array(logprobs.astype(mx.float32)).reshape(-1)
    top: tuple[TokenLogprob, ...] = ()
    if request.top_logprobs:
        best = np.argpartition(-values, request.top_logprobs - 1)[: request.top_logprobs]
        best = best[np.argsort(-values[best])]
        top = tuple(TokenLogprob(tokenizer.decode([int(t)]), float(values[t])) for t in best)
    return TokenLogprob(tokenizer.decode([token]), float(values[token])), top
