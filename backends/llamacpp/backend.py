"""`LlamaCppBackend`: loads a GGUF model and its context, tokenizes, renders chat, and decodes
through the batch loop (`batch`), one request at a time when it is alone."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import llama_cpp

from backends.base import (
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
from backends.chat_templates import builtin_for_architecture, render, resolve_template_setting
from backends.llamacpp.adapters import LoraAdapters
from backends.llamacpp.batch import LlamaCppBatch, ModelHandle
from backends.llamacpp.draft import DraftModel, vocab_mismatch
from backends.llamacpp.kv_layout import FLASH_ATTN, KV_TYPES, LlamaLog, default_kv_tokens, kv_bytes, model_meta
from backends.llamacpp.kv_slots import KvSlots
from backends.llamacpp.sampling import GrammarCompiler
from backends.llamacpp.speculative import SpeculativeStats
from backends.llamacpp.users import NativeUsers
from backends.llamacpp.vision import Vision, image_spans, load_vision
from backends.prompt_cache import PromptCache
from backends.reasoning import ReasoningFormat
from backends.tools import tool_format
from kernel.config import SAMPLING_FIELDS, TierSettings
from kernel.errors import InvalidRequestError, LLMServiceError, ModelUnavailableError, engine_errors
from kernel.gguf import GgufHeaderError, cached_gguf_header

log = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_backend_ready = False
_llama_log: LlamaLog | None = None  # installed with the backend; reports what a context allocates
CLOSE_WAIT_SECONDS = 30.0  # how long `close` waits for a tokenizer or grammar compile to leave the model
# The model card's sampling defaults are GGUF `general.sampling.<key>` (llama.cpp's common/ takes them
# for whatever the user did not set); the keys whose names differ from ours:
_CARD_KEYS = {"temperature": "temp", "repeat_penalty": "penalty_repeat"}


def _quiet_llama_log() -> None:
    # llama-cpp-python routes llama.cpp's log through a Python callback that prints every line
    # whose level passes its logger's level; unset, that is every debug line of every decode.
    library = logging.getLogger("llama-cpp-python")
    if library.level == logging.NOTSET:
        library.setLevel(logging.ERROR)


def init_llama_backend() -> None:
    """`llama_backend_init()` once per process, before any other llama.cpp call that touches a device.

    `Llama(...)` does this itself; code on the low-level API must, and must not race two loads
    (two tiers load on two threads at start-up) into ggml's device registry."""
    global _backend_ready, _llama_log
    with _backend_lock:
        if not _backend_ready:
            _quiet_llama_log()
            _llama_log = LlamaLog()
            _llama_log.install()
            llama_cpp.llama_backend_init()
            _backend_ready = True


class LlamaCppBackend(Backend):
    name = "llamacpp"

    def __init__(self, tier: TierSettings, model_path: str) -> None:
        self.tier = tier
        self.model_path = model_path
        self.max_batch_size = tier.max_batch
        self.n_batch = max(tier.n_batch, tier.max_batch)  # every generating sequence fits one step
        self._model: Any = None
        self._ctx: Any = None
        self.vocab: Any = None
        self.n_vocab = 0
        self.eos = -1
        self._kv_slots: KvSlots | None = None
        self._adapters: LoraAdapters | None = None
        self._grammars: GrammarCompiler | None = None
        self._vision: Vision | None = None  # the projector (`{TIER}_MMPROJ_PATH`), when the tier has one
        self._users = NativeUsers(tier.name)
        self._template: str | None = None
        self._template_source = "none"
        self._reasoning: ReasoningFormat | None = None
        self._bos = ""
        self._eos_text = ""
        self._device = "cpu"
        self.n_ctx = tier.n_ctx  # the context window: N_CTX, or less when a sequence's KV stream is smaller
        self.kv_bytes: int | None = None  # what llama.cpp allocated for KV (and recurrent state)
        self._sampling: dict[str, float] = {}
        self._speculative = SpeculativeStats()  # drafted / accepted tokens, over the tier's life
        self._draft: DraftModel | None = None  # SPECULATIVE=draft
        self.draft_kv_bytes: int | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        t = self.tier
        if t.speculative == "draft" and not t.draft_model_path:
            raise ModelUnavailableError(
                f"Tier {t.name}: SPECULATIVE=draft needs {t.name.upper()}_DRAFT_MODEL_PATH"
                " (a small GGUF sharing the model's vocabulary)"
            )
        if not os.path.isfile(self.model_path):
            raise ModelUnavailableError(f"Tier {t.name}: GGUF file not found: {self.model_path}")
        init_llama_backend()
        where = f"Tier {t.name}: llama.cpp could not load {self.model_path}"
        model = _open_model(self.model_path, t)
        if not model:
            raise ModelUnavailableError(f"{where} (see the log above)")
        slots = max(1, t.max_batch)
        self._device = _device(t.n_gpu_layers)
        kv_tokens = t.kv_tokens or default_kv_tokens(t, model, slots, _gpu_free() if self._device != "cpu" else None)
        threads = t.n_threads or default_threads()
        cp = self._context_params(slots, kv_tokens, threads)
        assert _llama_log is not None
        with _llama_log.capture() as lines:
            ctx = llama_cpp.llama_init_from_model(model, cp)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ModelUnavailableError(
                f"{where}: no context with {kv_tokens} tokens of KV could be created (see the log above;"
                f" {t.name.upper()}_KV_TOKENS, _KV_TYPE_K and _KV_TYPE_V set its size)"
            )
        self._model, self._ctx = model, ctx
        if t.projector is not None:
            self._load_projector(t.projector, threads)
        self.kv_bytes = kv_bytes(lines)
        self.n_ctx = min(t.n_ctx, llama_cpp.llama_n_ctx_seq(ctx))
        if self.n_ctx < t.n_ctx:
            log.warning(
                "Tier %s: a sequence holds %d tokens of KV (KV_TOKENS / MAX_BATCH), less than N_CTX=%d:"
                " the context window is %d",
                t.name,
                self.n_ctx,
                t.n_ctx,
                self.n_ctx,
            )
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        recurrent = bool(llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model))
        # A recurrent state is checkpointed whole, with any window beside it: no window test then.
        swa = 0 if t.swa_full or recurrent else llama_cpp.llama_model_n_swa(model)
        self._adapters = LoraAdapters(model, model_meta(model, "general.architecture") or "")
        self._grammars = GrammarCompiler(self.vocab, self._users)
        self._load_template()
        self._kv_slots = KvSlots(ctx, slots, swa=swa, recurrent=recurrent, cache=self._prompt_cache(model))
        if t.speculative == "draft":
            try:
                self._draft = self._load_draft(slots, threads)
            except BaseException:
                self.close()
                raise
        self._sampling = self._card(model)
        log.info(
            "Tier %s: llama.cpp on %s, %d threads, %d sequences x %d tokens, KV %s (K %s, V %s, flash attention %s)",
            t.name,
            self._device,
            threads,
            slots,
            self.n_ctx,
            _mib(self.kv_bytes),
            t.kv_type_k,
            t.kv_type_v,
            t.flash_attn,
        )

    def _load_projector(self, path: str, threads: int) -> None:
        """The projector beside the model; a missing or unreadable one fails the load."""
        try:
            if not os.path.isfile(path):
                raise ModelUnavailableError(f"Tier {self.tier.name}: projector GGUF not found: {path}")
            gpu, ubatch = self._device != "cpu", llama_cpp.llama_n_ubatch(self._ctx)
            self._vision = load_vision(self._model, path, threads, gpu, ubatch, f"Tier {self.tier.name}")
        except BaseException:
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._model = self._ctx = None
            raise
        self.reads_images = self._vision is not None

    def _context_params(self, slots: int, kv_tokens: int, threads: int) -> Any:
        t = self.tier
        cp = llama_cpp.llama_context_default_params()
        cp.n_seq_max = slots
        cp.n_ctx = kv_tokens
        cp.n_batch = self.n_batch
        cp.n_ubatch = min(self.n_batch, 512)
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = False  # one stream per sequence (see kv_layout)
        cp.swa_full = t.swa_full  # off: sliding-window layers keep their window; kv_slots checkpoints it
        cp.type_k, cp.type_v = KV_TYPES[t.kv_type_k], KV_TYPES[t.kv_type_v]
        cp.flash_attn_type = FLASH_ATTN[t.flash_attn]  # llama.cpp turns auto on for a quantized V
        cp.no_perf = True
        return cp

    def _load_draft(self, slots: int, threads: int) -> DraftModel:
        """The draft model of `SPECULATIVE=draft`, on the target's devices and threads, one KV stream
        per sequence as long as the target's; its KV is a second cost beside the target's."""
        t, path = self.tier, self.tier.draft_model_path or ""
        where = f"Tier {t.name}: the draft model {path}"
        if not os.path.isfile(path):
            raise ModelUnavailableError(f"{where}: GGUF file not found")
        model = _open_model(path, t)
        if not model:
            raise ModelUnavailableError(f"{where} could not be loaded (see the log above)")
        mismatch = vocab_mismatch(self.vocab, llama_cpp.llama_model_get_vocab(model))
        recurrent = llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        if mismatch is not None or recurrent:
            llama_cpp.llama_model_free(model)
            why = (
                f"its vocabulary differs from the model's ({self.model_path}): {mismatch}"
                if mismatch is not None
                else "it is recurrent (its state cannot be cut back to reject a draft)"
            )
            raise ModelUnavailableError(f"{where} cannot draft for this tier: {why}")
        n_ctx_seq = llama_cpp.llama_n_ctx_seq(self._ctx)
        assert _llama_log is not None
        with _llama_log.capture() as lines:
            ctx = llama_cpp.llama_init_from_model(model, self._context_params(slots, n_ctx_seq * slots, threads))
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ModelUnavailableError(f"{where}: no context with {n_ctx_seq} tokens per sequence (see the log above)")
        self.draft_kv_bytes = kv_bytes(lines)
        swa = 0 if t.swa_full else llama_cpp.llama_model_n_swa(model)
        log.info("Tier %s: draft model %s, KV %s", t.name, path, _mib(self.draft_kv_bytes))
        return DraftModel(model, ctx, self.n_batch, slots, swa=swa)

    def _prompt_cache(self, model: Any) -> PromptCache:
        """The prompt cache, its states marked with what makes them unusable anywhere else: the
        model file and projector, the KV layout and types, and the chat template (a state holds rendered tokens)."""
        t = self.tier
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(model, desc, len(desc))
        vision = self._vision
        projector = (os.path.basename(vision.path), os.path.getsize(vision.path)) if vision is not None else ()
        identity = "|".join(
            str(part)
            for part in (
                os.path.basename(self.model_path),
                os.path.getsize(self.model_path),
                desc.value.decode("utf-8", "replace"),
                llama_cpp.llama_model_n_params(model),
                llama_cpp.llama_n_ctx_seq(self._ctx),
                t.kv_type_k,
                t.kv_type_v,
                t.swa_full,
                hashlib.sha256((self._template or "").encode()).hexdigest()[:16],
                *projector,  # an image's KV comes from the projector
            )
        )
        folder = os.path.join(t.prompt_cache_dir, t.name) if t.prompt_cache_dir else ""
        return PromptCache(identity, t.prompt_cache_ram_bytes, folder, t.prompt_cache_disk_bytes)

    def read_card(self) -> dict[str, float] | None:
        if not os.path.isfile(self.model_path):
            return None
        try:  # the header alone: ~0.15 s on Gemma 3, where llama.cpp's vocab_only load took ~0.6 s
            meta = cached_gguf_header(self.model_path).meta
        except (OSError, GgufHeaderError):
            return None  # the registry then loads the model and reads the card from it
        card = {name: meta.get(f"general.sampling.{_CARD_KEYS.get(name, name)}") for name in SAMPLING_FIELDS}
        # As llama.cpp prints a float32 (std::to_string, 6 decimals): the same card as `_card`'s once
        # loaded, so an answer cached before the load keeps its key.
        card = {name: f"{v:.6f}" if isinstance(v, float) else v for name, v in card.items()}
        return card_sampling(card, f"Tier {self.tier.name}: {self.model_path}")

    def _card(self, model: Any) -> dict[str, float]:
        card = {name: model_meta(model, f"general.sampling.{_CARD_KEYS.get(name, name)}") for name in SAMPLING_FIELDS}
        return card_sampling(card, f"Tier {self.tier.name}: {self.model_path}")

    def _load_template(self) -> None:
        t = self.tier
        if t.chat_template:
            self._template, self._template_source = resolve_template_setting(t.chat_template), "setting"
        elif (gguf := model_meta(self._model, "tokenizer.chat_template")) is not None:
            self._template, self._template_source = gguf, "gguf"
        else:
            self._template = builtin_for_architecture(model_meta(self._model, "general.architecture") or "")
            self._template_source = "builtin" if self._template else "none"
        bos = llama_cpp.llama_vocab_bos(self.vocab)
        self._bos = _token_text(self.vocab, bos) if bos >= 0 else ""
        self._eos_text = _token_text(self.vocab, self.eos) if self.eos >= 0 else ""
        self._reasoning = self.probe_reasoning(self._template, self.tier.reasoning_parser)

    def close(self) -> None:
        # Threads other than the model's own (tokenizing beside it, compiling grammars) finish first.
        if not self._users.close(CLOSE_WAIT_SECONDS):
            log.error("Tier %s: the model is still in use after %.0f s; not freed", self.tier.name, CLOSE_WAIT_SECONDS)
            return
        if self._grammars is not None:
            self._grammars.close()
            self._grammars = None
        if self._kv_slots is not None and self._kv_slots.cache is not None:
            if self._kv_slots.cache.disk_budget:  # what the slots hold survives a restart
                self._kv_slots.save_all()
            self._kv_slots.cache.close()
        self._kv_slots = None
        if self._vision is not None:
            self._vision.close()
            self._vision = None
            self.reads_images = False
        if self._adapters is not None:
            self._adapters.forget()  # freed with the model
            self._adapters = None
        if self._draft is not None:
            self._draft.close()
            self._draft = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def reset_prefix_cache(self) -> None:
        if self._kv_slots is not None:
            self._kv_slots.clear()

    def speculative_stats(self) -> dict[str, int] | None:
        return self._speculative.view() if self.tier.speculative != "off" else None

    def prompt_cache_stats(self) -> dict[str, Any] | None:
        cache = self._kv_slots.cache if self._kv_slots is not None else None
        return cache.stats() if cache is not None else None

    @property
    def context(self) -> Any:
        if self._ctx is None:
            raise ModelUnavailableError(f"Tier {self.tier.name}: model is not loaded")
        return self._ctx

    @property
    def kv_slots(self) -> KvSlots:
        if self._kv_slots is None:
            raise ModelUnavailableError(f"Tier {self.tier.name}: model is not loaded")
        return self._kv_slots

    @property
    def adapters(self) -> LoraAdapters:
        if self._adapters is None:
            raise ModelUnavailableError(f"Tier {self.tier.name}: model is not loaded")
        return self._adapters

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        return self.adapters.load(name, path)

    def unload_adapter(self, name: str) -> None:
        if self._adapters is not None:
            self._adapters.unload(self.context, name)
            self.kv_slots.forget_adapter(name)

    def adapter_names(self) -> list[str]:
        return self._adapters.names() if self._adapters is not None else []

    @property
    def grammars(self) -> GrammarCompiler:
        if self._grammars is None:
            raise ModelUnavailableError(f"Tier {self.tier.name}: model is not loaded")
        return self._grammars

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="llamacpp",
            device=self._device,
            context_length=self.n_ctx,
            extras={
                "chat_template": self._template_source,
                "max_batch": self.max_batch_size,
                "kv_bytes": self.kv_bytes,
                "speculative": {"mode": self.tier.speculative, **self._speculative.view()},
                "prompt_cache": self.prompt_cache_stats(),
            },
            vocab_size=self.n_vocab,
            tool_format=tool_format(self._template, self.tier.tool_parser),
            reasoning=self._reasoning,
            sampling=self._sampling,
        )

    # -- prompts ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        add_bos = not (self._bos and text.startswith(self._bos))
        data = text.encode("utf-8")
        with self._users.use(), engine_errors("llama.cpp"):
            self.context  # noqa: B018 - raises when not loaded
            size = len(data) + 8
            buf = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, size, add_bos, True)
            if n < 0:
                size = -n
                buf = (llama_cpp.llama_token * size)()
                n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, size, add_bos, True)
            return list(buf[:n])

    def tokens(self, request: GenerationRequest) -> list[int]:
        """With images, mtmd splits the rendered prompt at their markers (`vision`)."""
        vision = self._vision
        if not request.images or vision is None or not self.reads_images:
            return super().tokens(request)  # (images without a projector: a 400 there)
        if request.messages is None:
            raise InvalidRequestError("images come in messages, not in a prompt", param="prompt")
        text = self.render_chat(request.messages, request.tools, template_variables(request))
        with self._users.use(), engine_errors("llama.cpp"):
            self.context  # noqa: B018 - raises when not loaded
            prompt = vision.tokenize(text, request.images, add_special=not (self._bos and text.startswith(self._bos)))
        if prompt and prompt[-1] < 0:  # nothing after the image to read its answer from
            raise InvalidRequestError("messages: the prompt ends with an image; add text after it", param="messages")
        return prompt

    def image_spans(self, prompt: Sequence[int], images: Sequence[ImageInput]) -> list[ImageSpan]:
        return image_spans(prompt, images)

    def detokenize(self, tokens: Sequence[int]) -> str:
        tokens = [t for t in tokens if t >= 0]  # an image's places (`vision`) have no text
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)
        size = 16 * len(tokens) + 16
        with self._users.use():
            self.context  # noqa: B018 - raises when not loaded
            while True:  # a negative count is the buffer size needed
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_detokenize(self.vocab, ids, len(tokens), buf, size, False, True)
                if n >= 0:
                    return buf.raw[:n].decode("utf-8", errors="replace")
                size = -n

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        if self._template is None:
            raise InvalidRequestError(
                f"The model of tier {self.tier.name} has no chat template; set "
                f"{self.tier.name.upper()}_CHAT_TEMPLATE or use /v1/completions",
                param="messages",
            )
        return render(self._template, messages, tools, variables, bos_token=self._bos, eos_token=self._eos_text)

    # -- generation ------------------------------------------------------------------------

    def open_batch(self) -> DecodeBatch:
        return LlamaCppBatch(self._handle())

    def _handle(self) -> ModelHandle:
        return ModelHandle(
            self.context,
            self.vocab,
            self.n_vocab,
            self.eos,
            self.n_batch,
            self.kv_slots,
            self.adapters,
            self.grammars,
            self.thinking_budget,
            device_sampling=self._device_sampling(),
            speculative=self.tier.speculative,
            draft_tokens=self.tier.draft_tokens,
            speculative_stats=self._speculative,
            vision=self._vision,
            draft=self._draft,
        )

    def _device_sampling(self) -> bool:
        """Whether requests that allow it sample in the decode graph: by default where it saves
        copying each logits row from a GPU (on the CPU it costs a graph per sequence for nothing)."""
        setting = self.tier.device_sampling
        return setting == "on" or (setting == "auto" and self._device != "cpu")

    def decode(
        self, prompt: list[int], request: GenerationRequest, max_tokens: int, cancel: threading.Event | None = None
    ) -> Iterator[Token]:
        """One request on its own: the batch loop with a single sequence. `cancel` is checked
        between steps, i.e. between `N_BATCH`-token pieces of the prompt."""
        if max_tokens <= 0:
            return iter(())
        batch = LlamaCppBatch(self._handle())
        batch.add(0, DecodeState(prompt, request, max_tokens))  # a bad schema fails before any token
        return self._run_one(batch, cancel)

    def _run_one(self, batch: LlamaCppBatch, cancel: threading.Event | None) -> Iterator[Token]:
        try:
            with engine_errors("llama.cpp"):
                while batch.pending(0):
                    if cancel is not None and cancel.is_set():
                        return
                    for _, token in batch.step():
                        if isinstance(token, LLMServiceError):
                            raise token
                        if token is None:
                            return
                        yield token
        finally:
            batch.remove(0)


def _open_model(path: str, tier: TierSettings) -> Any:
    """`llama_model_load_from_file` with the tier's device settings (NULL if it fails)."""
    with _backend_lock:  # one model load at a time in the process (see init_llama_backend)
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0x7FFFFFFF if tier.n_gpu_layers < 0 else tier.n_gpu_layers
        mp.load_mode = _load_mode(tier.use_mmap, tier.use_mlock)
        return llama_cpp.llama_model_load_from_file(path.encode("utf-8"), mp)


def _mib(size: int | None) -> str:
    return f"{size / 2**20:.1f} MiB" if size is not None else "size unknown"


def _load_mode(mmap: bool, mlock: bool) -> int:
    if mmap and mlock:
        return int(llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK)
    if mlock:
        return int(llama_cpp.LLAMA_LOAD_MODE_MLOCK)
    return int(llama_cpp.LLAMA_LOAD_MODE_MMAP if mmap else llama_cpp.LLAMA_LOAD_MODE_NONE)


def default_threads() -> int:
    """Physical cores we may run on, less one (llama.cpp counts cores, not hyper-threads).

    ggml's threads spin at a barrier every step: with one per core, the server's own event loop,
    tokenizers and torch tiers take cores from them and a step stalls (2 s per token was seen on
    2 busy cores, 0.25 s with one thread fewer). N_THREADS sets it explicitly."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores) - 1)


def _device(n_gpu_layers: int) -> str:
    """Where the layers run: the GPU backend's name as torch spells it ("cuda", "metal", "vulkan")
    when layers are offloaded to a GPU that llama.cpp found, else "cpu"."""
    # Asked after llama_backend_init and the model load, never before (see init_llama_backend).
    if n_gpu_layers == 0 or not llama_cpp.llama_supports_gpu_offload():
        return "cpu"
    gpus = _gpu_devices()
    if not gpus:
        return "cpu"
    log.info("llama.cpp GPU devices: %s", ", ".join(f"{backend} {name}" for backend, name in gpus))
    return gpus[0][0].lower()


def _gpu_free() -> int | None:
    """Free bytes on the first GPU in ggml's device registry (where the KV goes), None if unknown."""
    memory = _gpu_memory()
    return memory[0][0] if memory else None


def gpu_memory_total() -> int | None:
    """Total bytes of the GPUs in ggml's device registry (the memory budget's default on CUDA);
    0 where llama.cpp offloads to none, None where this llama-cpp-python cannot say."""
    init_llama_backend()  # ggml's device registry is filled by the backend's initialisation
    if not llama_cpp.llama_supports_gpu_offload():
        return 0
    memory = _gpu_memory()
    return None if memory is None else sum(total for _free, total in memory)


def _gpu_memory() -> list[tuple[int, int]] | None:
    """(free, total) bytes of each GPU in ggml's device registry; None without the ggml handle."""
    try:
        from llama_cpp._ggml import libggml as g
    except (ImportError, OSError, AttributeError):
        return None
    size = ctypes.c_size_t
    g.ggml_backend_dev_memory.restype, g.ggml_backend_dev_memory.argtypes = (
        None,
        [ctypes.c_void_p, ctypes.POINTER(size), ctypes.POINTER(size)],
    )
    found = []
    for dev in _gpu_handles(g):
        free, total = size(0), size(0)
        g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append((int(free.value), int(total.value)))
    return found


def _gpu_devices() -> list[tuple[str, str]]:
    """(backend, description) of each GPU in ggml's device registry, e.g. ("CUDA", "NVIDIA H100")."""
    try:
        from llama_cpp._ggml import libggml as g
    except (ImportError, OSError, AttributeError):  # a llama-cpp-python without the ggml handle
        return []
    void, text = ctypes.c_void_p, ctypes.c_char_p
    for fn, restype, argtypes in (
        (g.ggml_backend_dev_description, text, [void]),
        (g.ggml_backend_dev_backend_reg, void, [void]),
        (g.ggml_backend_reg_name, text, [void]),
    ):
        fn.restype, fn.argtypes = restype, argtypes
    found = []
    for dev in _gpu_handles(g):
        backend = g.ggml_backend_reg_name(g.ggml_backend_dev_backend_reg(dev)) or b"gpu"
        found.append((backend.decode(), (g.ggml_backend_dev_description(dev) or b"").decode(errors="replace")))
    return found


def _gpu_handles(g: Any) -> list[Any]:
    """ggml's GPU devices (`libggml`), in registry order."""
    void = ctypes.c_void_p
    for fn, restype, argtypes in (
        (g.ggml_backend_dev_count, ctypes.c_size_t, []),
        (g.ggml_backend_dev_get, void, [ctypes.c_size_t]),
        (g.ggml_backend_dev_type, ctypes.c_int, [void]),
    ):
        fn.restype, fn.argtypes = restype, argtypes
    devices = (g.ggml_backend_dev_get(i) for i in range(g.ggml_backend_dev_count()))
    return [dev for dev in devices if g.ggml_backend_dev_type(dev) in (1, 2)]  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU


def _token_text(vocab: Any, token: int) -> str:
    return bytes(llama_cpp.llama_vocab_get_text(vocab, token)).decode("utf-8", errors="replace")
