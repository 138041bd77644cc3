"""Per-sequence sampling for the llama.cpp engine, on llama.cpp's own sampler chain.

A plain request samples with one C call per token (`llama_sampler_sample`: logit bias, penalties,
top-k/top-p/min-p, temperature, a seeded RNG, all in C). A request with a grammar samples like
llama-server: the chain picks a token, the grammar checks only that token, and only when the
grammar rejects it is the grammar applied to the whole vocabulary and the token drawn again; the
full-vocabulary pass on every token (~262k candidates for Gemma) would stall the whole batch.
JSON-schema → GBNF compilation runs on a small thread pool (`GrammarCompiler`), never on the
model's thread.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from backends.base import GenerationRequest, ResponseFormat, TokenLogprob
from backends.llamacpp.users import NativeUsers
from kernel.errors import InvalidRequestError

PENALTY_LAST_N = 64  # tokens the penalties look back over (llama-server's and llama-cpp-python's default)
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


class Sampler:
    """One sequence's sampler chain (and grammar); owned by the model's thread, freed with `close`."""

    def __init__(self, vocab: Any, n_vocab: int, request: GenerationRequest, history: list[int]) -> None:
        self._vocab = vocab
        self._n_vocab = n_vocab
        self._chain = _chain(n_vocab, request)
        self._grammar: Any = None  # a llama_sampler, set by `attach_grammar`
        self._cur: np.ndarray[Any, Any] | None = None  # full-vocabulary candidates, grammar path only
        if request.repeat_penalty != 1.0 or request.presence_penalty or request.frequency_penalty:
            # The penalties count the tail of the prompt too, as llama-cpp-python's generate() did.
            for token in history[-PENALTY_LAST_N:]:
                llama_cpp.llama_sampler_accept(self._chain, token)

    def attach_grammar(self, grammar: Any) -> None:
        self._grammar = grammar
        self._cur = np.empty(self._n_vocab, dtype=_TOKEN_DATA)

    def sample(self, ctx: Any, index: int) -> int:
        """Draw the next token from the logits at batch output `index`, and record it."""
        if self._grammar is None:
            return int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self._n_vocab,))
        token = self._apply(logits, grammar_first=False)
        if not self.allows(token):
            token = self._apply(logits, grammar_first=True)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def accept(self, token: int) -> None:
        """Record a token chosen for the sampler (a forced one), so its penalties count it."""
        llama_cpp.llama_sampler_accept(self._chain, token)

    def allows(self, token: int) -> bool:
        """Whether the grammar (if any) accepts `token` next; for an end-of-generation token: whether
        the structured value is complete."""
        if self._grammar is None:
            return True
        one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 1.0, 0.0))
        array = llama_cpp.llama_token_data_array(one, 1, -1, False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        return bool(np.isfinite(one[0].logit))

    def _apply(self, logits: np.ndarray[Any, Any], *, grammar_first: bool) -> int:
        cur = self._cur
        assert cur is not None
        cur["id"] = _ids(self._n_vocab)
        cur["logit"] = logits
        cur["p"] = 0.0
        data = cur.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        array = llama_cpp.llama_token_data_array(data, self._n_vocab, -1, False)
        if grammar_first:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(array))
        return int(array.data[array.selected].id)  # samplers may move the data: read it from the array

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None


def _chain(n_vocab: int, r: GenerationRequest) -> Any:
    """llama-server's order: bias, penalties, truncation, temperature, then the draw."""
    params = llama_cpp.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = llama_cpp.llama_sampler_chain_init(params)
    add = functools.partial(llama_cpp.llama_sampler_chain_add, chain)
    if r.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(r.logit_bias))(
            *(llama_cpp.llama_logit_bias(token, bias) for token, bias in r.logit_bias)
        )
        add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(r.logit_bias), biases))
    if r.repeat_penalty != 1.0 or r.presence_penalty or r.frequency_penalty:
        add(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab, PENALTY_LAST_N, r.repeat_penalty, r.frequency_penalty, r.presence_penalty
            )
        )
    if r.temperature <= 0:
        # Truncation cannot change the most likely token: greedy skips it.
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if r.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(r.top_k))
    if r.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(r.top_p, 1))
    if r.min_p > 0.0:
        add(llama_cpp.llama_sampler_init_min_p(r.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(r.temperature))
    # A seeded chain draws from its own RNG, so a request's draws do not depend on its neighbours.
    seed = r.seed if r.seed is not None else int.from_bytes(os.urandom(4), "little")
    add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


@functools.lru_cache(maxsize=4)
def _ids(n_vocab: int) -> np.ndarray[Any, Any]:
    return np.arange(n_vocab, dtype=np.int32)


def logprobs(
    ctx: Any, index: int, n_vocab: int, token: int, top: int, piece: Any
) -> tuple[TokenLogprob, tuple[TokenLogprob, ...]]:
    """The chosen token's log-probability under the raw logits, and the `top` most likely ones."""
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(n_vocab,))
    peak = float(logits.max())
    norm = peak + float(np.log(np.exp(logits - peak).sum()))
    chosen = TokenLogprob(piece(token), float(logits[token]) - norm)
    if top <= 0:
        return chosen, ()
    best = np.argpartition(logits, -top)[-top:]
    best = best[np.argsort(-logits[best])]
    return chosen, tuple(TokenLogprob(piece(int(t)), float(logits[t]) - norm) for t in best)


class TextStream:
    """Token pieces → text, holding back a multi-byte character until all its bytes arrived."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, piece: bytes, *, final: bool = False) -> str:
        return str(self._decoder.decode(piece, final))


# -- grammars --------------------------------------------------------------------------------


class GrammarCompiler:
    """Compiles `response_format` into a llama.cpp grammar sampler on its own threads."""

    def __init__(self, vocab: Any, users: NativeUsers, workers: int = 2) -> None:
        self._vocab = vocab
        self._users = users  # the model's: it is not freed while a compile reads its vocabulary
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llamacpp-grammar")

    def submit(self, fmt: ResponseFormat) -> Future[Any]:
        return self._pool.submit(self._compile, fmt)

    def compile(self, fmt: ResponseFormat) -> Any:
        """Compile on the calling thread (for callers that have nothing else to do meanwhile)."""
        return self._compile(fmt)

    def _compile(self, fmt: ResponseFormat) -> Any:
        text = _gbnf(json.dumps(fmt.schema, sort_keys=True)) if fmt.schema is not None else JSON_GBNF
        with self._users.use():
            grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, text.encode("utf-8"), b"root")
        if not grammar:
            raise InvalidRequestError("The JSON schema could not be compiled to a grammar.", param="response_format")
        return grammar

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@functools.lru_cache(maxsize=64)
def _gbnf(schema: str) -> str:
    try:
        return str(json_schema_to_gbnf(schema))
    except (ValueError, TypeError, KeyError, RecursionError, NotImplementedError) as exc:
        raise InvalidRequestError(f"Unsupported JSON schema: {exc}", param="response_format") from None


def free_sampler(future: Future[Any]) -> None:
    """A done-callback for a grammar nobody is waiting for any more."""
    if not future.cancelled() and future.exception() is None:
        llama_cpp.llama_sampler_free(future.result())
