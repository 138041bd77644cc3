"""llama.cpp engine (llama-cpp-python): GGUF models on Metal, CUDA or plain CPUs."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from backends.base import Backend, EngineInfo, GenerationRequest, ResponseFormat, Token
from backends.chat_templates import builtin_for_architecture, render, resolve_template_setting
from backends.tools import tool_format
from kernel.config import TierSettings
from kernel.errors import InvalidRequestError, ModelUnavailableError, engine_errors

log = logging.getLogger(__name__)


class LlamaCppBackend(Backend):
    name = "llamacpp"

    def __init__(self, tier: TierSettings, model_path: str) -> None:
        self.tier = tier
        self.model_path = model_path
        self._llm: llama_cpp.Llama | None = None
        self._template: str | None = None
        self._template_source = "none"
        self._bos = ""
        self._eos = ""

    @property
    def llm(self) -> llama_cpp.Llama:
        if self._llm is None:
            raise ModelUnavailableError(f"Tier {self.tier.name}: model is not loaded")
        return self._llm

    def load(self) -> None:
        t = self.tier
        if not os.path.isfile(self.model_path):
            raise ModelUnavailableError(f"Tier {t.name}: GGUF file not found: {self.model_path}")
        try:
            self._llm = llama_cpp.Llama(
                model_path=self.model_path,
                n_ctx=t.n_ctx,
                n_batch=t.n_batch,
                n_threads=t.n_threads or None,
                n_gpu_layers=t.n_gpu_layers,
                use_mmap=t.use_mmap,
                use_mlock=t.use_mlock,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelUnavailableError(f"Tier {t.name}: llama.cpp could not load {self.model_path}: {exc}") from exc
        meta = self._llm.metadata
        if t.chat_template:
            self._template, self._template_source = resolve_template_setting(t.chat_template), "setting"
        elif "tokenizer.chat_template" in meta:
            self._template, self._template_source = meta["tokenizer.chat_template"], "gguf"
        else:
            self._template = builtin_for_architecture(meta.get("general.architecture", ""))
            self._template_source = "builtin" if self._template else "none"
        model = self._llm._model
        self._bos = model.token_get_text(self._llm.token_bos()) if self._llm.token_bos() >= 0 else ""
        self._eos = model.token_get_text(self._llm.token_eos()) if self._llm.token_eos() >= 0 else ""

    def info(self) -> EngineInfo:
        gpu = llama_cpp.llama_supports_gpu_offload() and self.tier.n_gpu_layers != 0
        return EngineInfo(
            engine="llamacpp",
            device="gpu" if gpu else "cpu",
            context_length=self._llm.n_ctx() if self._llm else self.tier.n_ctx,
            extras={"chat_template": self._template_source},
            vocab_size=self._llm.n_vocab() if self._llm else 0,
            tool_format=tool_format(self._template, self.tier.tool_parser),
        )

    def encode(self, text: str) -> list[int]:
        add_bos = not (self._bos and text.startswith(self._bos))
        with engine_errors("llama.cpp"):
            return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def render_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> str:
        if self._template is None:
            raise InvalidRequestError(
                f"The model of tier {self.tier.name} has no chat template; set "
                f"{self.tier.name.upper()}_CHAT_TEMPLATE or use /v1/completions",
                param="messages",
            )
        return render(self._template, messages, tools, bos_token=self._bos, eos_token=self._eos)

    def decode(
        self, prompt: list[int], request: GenerationRequest, max_tokens: int, cancel: threading.Event | None = None
    ) -> Iterator[Token]:
        llm = self.llm
        cached = _reused_prefix(llm, prompt)
        llm.set_seed(request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "little"))
        grammar = _grammar(request.response_format)
        vocab = llm._model.vocab
        pending = b""
        with engine_errors("llama.cpp"), _cancellable_eval(llm, cancel):
            tokens = llm.generate(
                prompt,
                top_k=request.top_k,
                top_p=request.top_p,
                min_p=request.min_p,
                temp=request.temperature,
                repeat_penalty=request.repeat_penalty,
                grammar=grammar,
            )
            try:
                for n, token in enumerate(tokens):
                    if llama_cpp.llama_vocab_is_eog(vocab, token):
                        return
                    # A token can end inside a multi-byte character: hold bytes until they decode.
                    pending += llm.detokenize([token])
                    text, pending = _split_utf8(pending)
                    yield Token(text, cached_tokens=cached if n == 0 else 0)
                    if n + 1 >= max_tokens:
                        return
            except _Cancelled:
                return  # the client left during the prompt; the evaluated batches stay cached
            finally:
                tokens.close()

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def reset_prefix_cache(self) -> None:
        if self._llm is not None:
            self._llm.reset()  # type: ignore[no-untyped-call]  # the next prompt starts from scratch


class _Cancelled(Exception):
    """Raised between prompt batches once the request's cancel event is set."""


@contextmanager
def _cancellable_eval(llm: llama_cpp.Llama, cancel: threading.Event | None) -> Iterator[None]:
    """Check `cancel` between `n_batch`-sized prompt batches while `llm.generate` evaluates.

    llama-cpp-python has no hook inside `Llama.eval`, so the instance's `eval` is shadowed by one
    that feeds it the same batches one at a time: the same shapes, hence the same numbers."""
    if cancel is None:
        yield
        return
    original = llm.eval

    def eval_in_batches(tokens: Sequence[int]) -> None:
        for start in range(0, len(tokens), llm.n_batch):
            if cancel.is_set():
                raise _Cancelled
            original(tokens[start : start + llm.n_batch])

    setattr(llm, "eval", eval_in_batches)  # noqa: B010 - mypy refuses assigning to a method
    try:
        yield
    finally:
        delattr(llm, "eval")


def _reused_prefix(llm: llama_cpp.Llama, prompt: list[int]) -> int:
    """How many prompt tokens llama.cpp will take from its KV cache (mirrors Llama.generate)."""
    n = 0
    for a, b in zip(llm._input_ids[: llm.n_tokens], prompt, strict=False):
        if a != b:
            break
        n += 1
    return n - 1 if n == len(prompt) and n > 0 else n


def _split_utf8(data: bytes) -> tuple[str, bytes]:
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace"), b""


def _grammar(fmt: ResponseFormat | None) -> LlamaGrammar | None:
    if fmt is None:
        return None
    try:
        if fmt.type == "json_schema" and fmt.schema is not None:
            return LlamaGrammar.from_json_schema(json.dumps(fmt.schema), verbose=False)
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)  # its root rule is `object`
    except (ValueError, RuntimeError, TypeError) as exc:
        raise InvalidRequestError(f"Unsupported JSON schema: {exc}", param="response_format") from None
