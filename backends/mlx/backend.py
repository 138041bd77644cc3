"""`MlxBackend`: loads an mlx-lm model, tokenizes, renders chat, and decodes one request at a time
with `generate_step` (several together go through `batch`), both around the prefix cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from jinja2 import TemplateError
from mlx_lm import load as mlx_load
from mlx_lm.generate import generate_step, wired_limit
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _download, load_tokenizer

from backends.base import (
    RESERVED_TEMPLATE_NAMES,
    AdapterInfo,
    Backend,
    DecodeBatch,
    DecodeState,
    EngineInfo,
    GenerationRequest,
    ImageInput,
    ImageSpan,
    Token,
    card_sampling,
    template_variables,
)
from backends.mlx.adapters import LoraAdapters
from backends.mlx.batch import ENGINE, MlxBatch, ModelHandle
from backends.mlx.cache_state import MlxStateCodec
from backends.mlx.prefix_cache import MlxPromptCache, PrefixCache
from backends.mlx.sampling import GrammarCompiler, TextStream, sampler, score_prompt, scores
from backends.mlx.speculative import SpecStats, vocabulary_mismatch
from backends.reasoning import ReasoningFormat
from backends.tools import fold_tools, template_messages, template_takes_tools, tool_format
from kernel.config import SAMPLING_FIELDS, vision_folder
from kernel.errors import InvalidRequestError, LLMServiceError, ModelUnavailableError, engine_errors

if TYPE_CHECKING:
    from llguidance import LLMatcher

    from backends.mlx.vision import VisionLanguageModel
    from kernel.config import TierSettings

log = logging.getLogger(__name__)
_CARD_KEYS = {"repeat_penalty": "repetition_penalty"}  # generation_config.json's names where they differ


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
        self._grammars: GrammarCompiler | None = None
        self.prefix_cache = PrefixCache(tier.prefix_cache_entries)
        self._adapters = LoraAdapters(tier.prefix_cache_entries)
        self._local = Path(model_path)  # the model folder, once load() resolved it
        self._sampling: dict[str, float] = {}
        self.spec_stats = SpecStats()
        self._vision: VisionLanguageModel | None = None  # a VLM folder's images side (mlx-vlm)
        self._draft_model: Any = None  # SPECULATIVE=draft: the draft model's modules
        self._batchable = False  # the model's caches merge (BatchGenerator), known at load

    def _load_draft(self, tokenizer: Any) -> Any:
        """The draft model, refused unless its vocabulary is the model's (its drafts are token ids)."""
        tier, path = self.tier.name or "?", self.tier.draft_model_path
        if not path:
            raise ModelUnavailableError(
                f"Tier {tier}: SPECULATIVE=draft needs {tier.upper()}_DRAFT_MODEL_PATH"
                " (a small MLX model sharing the model's tokenizer)"
            )
        model, draft_tokenizer = _load_folder(path, f"Tier {tier}: cannot load MLX draft model", _mlx_load)[1:]
        mismatch = vocabulary_mismatch(tokenizer, draft_tokenizer)
        if mismatch is not None:
            message = f"the draft model {path!r} does not share the vocabulary of {self.model_path!r}: {mismatch}"
            raise ModelUnavailableError(f"Tier {tier}: {message}")
        return model

    # -- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        if self._model is not None:
            return
        tier = self.tier.name or "?"
        where = f"Tier {tier}: cannot load MLX model"
        self._local, model, tokenizer = _load_folder(self.model_path, where, self._load_model)
        if self.tier.speculative == "draft":
            self._draft_model = self._load_draft(tokenizer)
        eos = set(tokenizer.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self._model, self._tokenizer, self._eos = model, tokenizer, frozenset(eos)
        self._grammars = GrammarCompiler(tokenizer, self._eos)
        self._sampling = self._card(self._local)
        self._reasoning = self.probe_reasoning(self._template_source(), self.tier.reasoning_parser)
        self.prefix_cache = PrefixCache(self.tier.prefix_cache_entries, self._prompt_cache())
        # BatchGenerator merges per-sequence caches; models whose caches cannot merge (some
        # state-space layers) decode one request at a time, as mlx_lm.server does.
        batchable = self._batchable = all(hasattr(c, "merge") for c in make_prompt_cache(model))
        self.max_batch_size = self.tier.max_batch if batchable else 1
        if not batchable and self.tier.max_batch > 1:
            log.info("Tier %s: this model's KV cache cannot be batched; one request at a time", self.tier.name)

    def _load_model(self, folder: Path) -> tuple[Any, Any]:
        return self._load_vision(folder) if vision_folder(folder) else _mlx_load(folder)

    def _load_vision(self, folder: Path) -> tuple[Any, Any]:
        """A vision-language model: mlx-vlm loads it, and its language model decodes as mlx-lm's do."""
        try:
            from backends.mlx.vision import VisionLanguageModel
        except ImportError as exc:
            raise ModelUnavailableError(
                f"Tier {self.tier.name or '?'}: {folder} is a vision-language model, which needs mlx-vlm: "
                "pip install 'llmservice[mlx-vlm]'"
            ) from exc
        self._vision = VisionLanguageModel(folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        self.reads_images = True
        return self._vision.text, load_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))  # type: ignore[no-untyped-call]

    def _prompt_cache(self) -> MlxPromptCache | None:
        """The prompt cache tiers, their states marked with what makes them unusable anywhere else:
        the model (its config and weights' size) and the chat template (a state holds rendered tokens).
        Only the base model's sequences go there: an adapter's KV stays in its own prefix cache."""
        t = self.tier
        if not (t.prompt_cache_ram_bytes or (t.prompt_cache_dir and t.prompt_cache_disk_bytes)):
            return None
        config = self._local / "config.json"
        weights = sum(p.stat().st_size for p in self._local.glob("*.safetensors"))
        identity = "|".join(
            str(part)
            for part in (
                "mlx",
                self._local.name,
                hashlib.sha256(config.read_bytes() if config.is_file() else b"").hexdigest()[:16],
                weights,
                hashlib.sha256((self._template_source() or "").encode()).hexdigest()[:16],
            )
        )
        folder = os.path.join(t.prompt_cache_dir, t.name) if t.prompt_cache_dir else ""
        return MlxPromptCache(identity, MlxStateCodec(), t.prompt_cache_ram_bytes, folder, t.prompt_cache_disk_bytes)

    def close(self) -> None:
        self._vision = None
        self.prefix_cache.close()  # with a disk tier, what it holds survives a restart
        self._adapters.clear()
        self._model = self._tokenizer = self._grammars = self._draft_model = None
        mx.clear_cache()

    def reset_prefix_cache(self) -> None:
        self.prefix_cache.clear()
        self._adapters.reset_prefix_caches()

    def prompt_cache_stats(self) -> dict[str, Any] | None:
        tiers = self.prefix_cache.tiers
        return tiers.stats() if tiers is not None else None

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine=ENGINE,
            device=mx.default_device().type.name,
            context_length=self.tier.n_ctx,
            extras={
                "model_path": self.model_path,
                "prefix_cache_entries": self.prefix_cache.capacity,
                "prompt_cache": self.prompt_cache_stats(),
                "structured_output": "llguidance",
                "max_batch": self.max_batch_size,
                "speculative": self.tier.speculative,
                "draft_model_path": self.tier.draft_model_path if self._draft_model is not None else None,
                "drafted_tokens": self.spec_stats.drafted,
                "accepted_tokens": self.spec_stats.accepted,
            },
            vocab_size=self._tokenizer.vocab_size if self._tokenizer is not None else 0,
            tool_format=tool_format(self._template_source(), self.tier.tool_parser),
            reasoning=self._reasoning,
            sampling=self._sampling,
        )

    def speculative_stats(self) -> dict[str, int] | None:
        if self.tier.speculative == "off":
            return None
        return {"drafted": self.spec_stats.drafted, "accepted": self.spec_stats.accepted}

    def read_card(self) -> dict[str, float] | None:
        folder = Path(self.model_path).expanduser()  # a hub id's folder is known once load() resolved it
        return self._card(folder) if folder.is_dir() else None

    def _card(self, folder: Path) -> dict[str, float]:
        return card_sampling(_generation_config(folder), f"Tier {self.tier.name}: {folder}")

    def _template_source(self) -> str | None:
        template = self.tier.chat_template
        return template or (getattr(self._tokenizer, "chat_template", None) if self._tokenizer else None)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every token that ends generation (config.json and generation_config.json)."""
        return self._eos

    # -- prompts ---------------------------------------------------------------------------

    def tokens(self, request: GenerationRequest) -> list[int]:
        if not request.images or self._vision is None or request.messages is None:
            return super().tokens(request)
        text = self.render_chat(request.messages, request.tools, template_variables(request))
        with engine_errors(ENGINE):
            return self._vision.tokens(text, request.images, self._require()[1].bos_token)

    def image_spans(self, prompt: Sequence[int], images: Sequence[ImageInput]) -> list[ImageSpan]:
        return self._vision.spans(prompt, len(images)) if self._vision is not None else []

    def encode(self, text: str) -> list[int]:
        tokenizer = self._require()[1]
        bos = tokenizer.bos_token
        add_special = bos is None or not text.startswith(bos)
        with engine_errors(ENGINE):
            return [int(t) for t in tokenizer.encode(text, add_special_tokens=add_special)]

    def detokenize(self, tokens: Sequence[int]) -> str:
        tokenizer = self._require()[1]
        with engine_errors(ENGINE):
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
            with engine_errors(ENGINE):
                text = render(template_messages(messages), add_generation_prompt=True, tokenize=False, **extra)
        except TemplateError as exc:
            # Templates reject bad conversations themselves (e.g. roles that do not alternate).
            message = f"The chat template rejected the messages: {exc}"
            raise InvalidRequestError(message, param="messages") from exc
        return str(text)

    # -- LoRA adapters ---------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """An mlx-lm adapter folder on a copy of the model's modules sharing its weights (`adapters`)."""
        return self._adapters.load(self._require()[0], self._local, name, path)

    def unload_adapter(self, name: str) -> None:
        self._adapters.unload(name)

    def adapter_names(self) -> list[str]:
        return self._adapters.names()

    # -- generation ------------------------------------------------------------------------

    def decode(
        self, prompt: list[int], request: GenerationRequest, max_tokens: int, cancel: threading.Event | None = None
    ) -> Iterator[Token]:
        handle = self._handle()
        if handle.speculative != "off" and self._batchable:
            # One request at a time (MAX_BATCH=1, `stream`) speculates too: a batch of one.
            return _speculate(MlxBatch(handle), DecodeState(list(prompt), request, max_tokens), cancel)
        model, prefix_cache = handle.model_for(request.adapter)
        # Checked before the first token, so a bad schema is a 400 and not a broken stream.
        matcher = handle.grammars.matcher(request.response_format) if request.response_format else None
        return _generate(handle, model, prefix_cache, list(prompt), request, max_tokens, matcher, cancel)

    def open_batch(self) -> DecodeBatch:
        return MlxBatch(self._handle())

    def _handle(self) -> ModelHandle:
        model, tokenizer = self._require()
        assert self._grammars is not None  # made with the model
        return ModelHandle(
            model,
            tokenizer,
            self.prefix_cache,
            self._adapters,
            self._grammars,
            self._eos,
            self.max_batch_size,
            self.tier.n_batch,
            self.thinking_budget,
            self.tier.speculative,
            self.tier.draft_tokens,
            self.spec_stats,
            self._vision,
            self._draft_model,
        )

    def _require(self) -> tuple[Any, Any]:
        if self._model is None:
            raise ModelUnavailableError(f"The MLX model {self.model_path!r} is not loaded.")
        return self._model, self._tokenizer


def _mlx_load(folder: Path) -> tuple[Any, Any]:
    model, tokenizer = mlx_load(str(folder))[:2]
    return model, tokenizer


def _load_folder(path: str, where: str, loader: Callable[[Path], tuple[Any, Any]]) -> tuple[Path, Any, Any]:
    """A model folder or hub repo id, loaded by `loader`: (its folder, the model, its tokenizer)."""
    where = f"{where} {path!r}"
    source = path
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        # A local path: say so plainly instead of letting it be tried as a hub repo id.
        local = Path(source).expanduser()
        if not local.is_dir():
            raise ModelUnavailableError(f"{where}: no such folder")
        source = str(local)
    try:
        folder = _download(source)  # the folder (a hub id resolves to its cached copy)
        model, tokenizer = loader(folder)
    except ModelUnavailableError:
        raise
    except Exception as exc:
        # Loading fails in many library-specific ways (missing files, hub errors, unknown
        # architectures); to a client they all mean "this model cannot be served".
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnavailableError(f"{where}: {reason}") from exc
    return folder, model, tokenizer


def _speculate(batch: MlxBatch, state: DecodeState, cancel: threading.Event | None) -> Iterator[Token]:
    """A request's tokens from a batch of its own (so it speculates as in a shared one)."""
    try:
        batch.add(0, state)
        while batch.live and not (cancel is not None and cancel.is_set()):
            for _, token in batch.step():
                if isinstance(token, LLMServiceError):
                    raise token
                if token is not None:
                    yield token
    finally:
        batch.remove(0)  # its cache goes to the prefix cache, as on the plain path
        batch.close()


def _generate(
    handle: ModelHandle,
    model: Any,
    prefix_cache: PrefixCache,
    prompt: list[int],
    request: GenerationRequest,
    max_tokens: int,
    matcher: LLMatcher | None,
    cancel: threading.Event | None,
) -> Iterator[Token]:
    """One request with mlx-lm's `generate_step`, from and back into the prefix cache."""
    if max_tokens <= 0:
        return
    tokenizer = handle.tokenizer
    with engine_errors(ENGINE):
        begin = handle.fetch(model, prefix_cache, prompt, request)
    cache, reused, start = begin.cache, begin.reused, begin.start
    if cache is None:
        cache = make_prompt_cache(model)
    processors = handle.processors(prompt[:start], request, prompt, matcher)
    piece = handle.grammars.piece
    scored_prompt = score_prompt(model, piece, prompt, request) if request.prompt_logprobs else ()
    text = TextStream(tokenizer, prompt)
    generated: list[int] = []
    eos: list[int] = []  # the end-of-generation token, once the model emits it
    prefilled = [0]  # prompt tokens after `start` that are in the cache so far
    kept: list[int] | None = None  # the tokens the cache holds, when it is worth keeping

    def on_prefill(done: int, total: int) -> None:
        if done < total:  # the last call comes after the first token: the loop handles that
            prefilled[0] = done
            if cancel is not None and cancel.is_set():
                raise _Cancelled

    with engine_errors(ENGINE), wired_limit(model):
        steps = generate_step(
            mx.array(prompt[start:]),
            model,
            max_tokens=max_tokens,
            sampler=sampler(request),
            logits_processors=processors,
            prompt_cache=cache,
            prefill_step_size=handle.prefill_step,
            prompt_progress_callback=on_prefill,
        )
        try:
            for step, logprobs in steps:
                token = int(step)  # annotated as an array; generate_step yields a plain int
                if token in handle.eos:
                    eos.append(token)
                    break
                generated.append(token)
                final = matcher is not None and matcher.is_stopped()
                done = len(generated) == max_tokens or final
                first = len(generated) == 1
                chosen, top = scores(piece, logprobs, token, request) if request.logprobs else (None, ())
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
            kept = prompt[: start + prefilled[0]]  # cancelled mid-prompt: a retry resumes here
        finally:
            steps.close()
            if kept is not None:
                prefix_cache.store(begin.key(kept), cache)


class _Cancelled(Exception):
    """Raised from the prompt-progress callback once the request's cancel event is set."""


def _generation_config(folder: Path) -> dict[str, object]:
    """The sampling defaults in the folder's `generation_config.json` (transformers' names), as
    llama.cpp's converter copies them into a GGUF: `do_sample` is not read there either."""
    try:
        config = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    return {name: config.get(_CARD_KEYS.get(name, name)) for name in SAMPLING_FIELDS}
