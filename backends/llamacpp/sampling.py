"""Per-sequence sampling for the llama.cpp engine: llama.cpp's samplers on as few tokens as is exact.

`llama_sampler_sample` copies the whole logits row into a candidates array (262k entries for Gemma)
and the penalties sampler looks every one of them up in its counts: ~0.75 ms per token per stream
at a 128k vocabulary. Here the row is read in place, as a numpy view of llama.cpp's buffer:
- logit bias and penalties change only their own tokens (the biased ones, the last
  `PENALTY_LAST_N`): they are written into the row for the step and the originals put back
  afterwards (logprobs report the raw logits); the penalties run llama.cpp's own sampler on that
  small gather, so the arithmetic is its own;
- greedy is an argmax over the row (llama.cpp's greedy also keeps the first of equal maxima);
- with `top_k` > 0, or `min_p` alone, the tokens that can survive the truncation are found with
  numpy and only they go through llama.cpp's chain (top-k, top-p, min-p, temperature, the seeded
  draw): the chain sees the same sorted top-k (or the same min-p survivors, in vocabulary order)
  as on the whole row, so the draw and its RNG are llama.cpp's and a seed gives what it gave;
- top-p without top-k, or no truncation at all, normalises over the whole vocabulary (as does a
  vocabulary under 64k, where llama.cpp's C copy is the cheaper): `llama_sampler_sample` copies
  the adjusted row, as before.
One exception to "the same token": logits exactly equal at the top-k boundary or within the top k
may be ordered differently by llama.cpp's unstable sorts (the distribution is the same).

On a GPU (`offload`), a request that needs no grammar, logprobs or forced tokens samples like
llama-server's `backend_sampling`: its whole chain (bias, penalties, truncation, the seeded draw)
is attached to its sequence with `llama_set_sampler` and runs in the decode graph, so only the
token comes back, not its logits row. llama-cpp-python 0.3.36 does not bind that function; it is
bound here from the same library. Seeded draws there use llama.cpp's backend arithmetic, so a seed
may give another (equally likely) token than on the CPU.

A request with a grammar samples like llama-server: the chain picks a token, the grammar checks
only that token, and only when the grammar rejects it is the grammar applied to the whole
vocabulary and the token drawn again. JSON-schema → GBNF compilation runs on a small thread pool
(`GrammarCompiler`), never on the model's thread.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import json
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from backends.base import RANDOM_SEED, GenerationRequest, ResponseFormat, TokenLogprob
from backends.llamacpp.users import NativeUsers
from kernel.errors import InvalidRequestError

PENALTY_LAST_N = 64  # tokens the penalties look back over (llama-server's and llama-cpp-python's default)
_GROUPS = 32  # the row is cut into this many strided groups to bound the top-k cheaply
# Below this vocabulary size llama.cpp's own copy and partial sort cost less than finding the
# survivors with numpy (~15 small numpy calls): the chain then runs on the whole (adjusted) row.
_SURVIVORS_FROM = 65536
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


class Sampler:
    """One sequence's sampling state (and grammar); owned by the model's thread, freed with `close`."""

    def __init__(self, vocab: Any, n_vocab: int, request: GenerationRequest, history: list[int]) -> None:
        self._vocab = vocab
        self._n_vocab = n_vocab
        self._chain = _chain(n_vocab, request, adjust=False)
        self._grammar: Any = None  # a llama_sampler, set by `attach_grammar`
        self._cur: np.ndarray[Any, Any] | None = None  # whole-vocabulary candidates, allocated on first use
        bias = [(token, value) for token, value in request.logit_bias if 0 <= token < n_vocab]
        self._bias_ids = np.array([t for t, _ in bias], dtype=np.intp)
        self._bias = np.array([v for _, v in bias], dtype=np.float32)
        self._penalties: Any = None  # llama.cpp's penalties sampler, applied to the recent tokens only
        self._recent: deque[int] = deque(maxlen=PENALTY_LAST_N)
        if _penalised(request):
            self._penalties = _penalties(n_vocab, request)
            # The penalties count the tail of the prompt too, as llama-cpp-python's generate() did.
            for token in history[-PENALTY_LAST_N:]:
                self._remember(token)
        self._greedy = request.temperature <= 0
        self._request, self._history = request, history[-PENALTY_LAST_N:]  # for `offload`
        self._device: tuple[Any, int, Any] | None = None  # (context, sequence, chain) when offloaded
        self._top_k = request.top_k if request.top_k > 0 else 0
        # min-p alone keeps the tokens within log(min_p) of the best one: found without sorting.
        self._min_p = request.min_p if request.top_k <= 0 and request.top_p >= 1.0 else 0.0

    def attach_grammar(self, grammar: Any) -> None:
        self._grammar = grammar

    def offload(self, ctx: Any, seq: int) -> bool:
        """Sample sequence `seq` in the decode graph from now on (see the module docstring); False
        where this llama.cpp cannot. Before the first `sample`, and only for a request without
        grammar, logprobs or forced tokens: its logits row no longer reaches the host."""
        if _set_sampler is None or self._grammar is not None:
            return False
        chain = reference_chain(self._n_vocab, self._request, self._history)
        if not _set_sampler(ctx, seq, chain):
            llama_cpp.llama_sampler_free(chain)
            return False
        self._device = (ctx, seq, chain)
        return True

    def sample(self, ctx: Any, index: int) -> int:
        """Draw the next token from the logits at batch output `index`, and record it."""
        if self._device is not None:  # drawn in the graph: llama.cpp hands it over (and records it)
            return int(llama_cpp.llama_sampler_sample(self._device[2], ctx, index))
        logits = logits_row(ctx, index, self._n_vocab)
        saved = self._adjust(logits)
        try:
            token, accepted = self._pick(ctx, index, logits)
            if self._grammar is not None and not self.allows(token):
                token = self._select_all(logits, grammar_first=True)
        finally:
            if saved is not None:
                logits[saved[0]] = saved[1]
        if self._grammar is not None:
            llama_cpp.llama_sampler_accept(self._grammar, token)
        self.accept(token, chain=not accepted)
        return token

    def accept(self, token: int, *, chain: bool = True) -> None:
        """Record a token chosen for the sampler (a forced one), so its penalties count it."""
        if self._device is not None:
            llama_cpp.llama_sampler_accept(self._device[2], token)
            return
        if self._penalties is not None:
            self._remember(token)
        if chain:
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

    def _remember(self, token: int) -> None:
        self._recent.append(token)
        llama_cpp.llama_sampler_accept(self._penalties, token)

    def _adjust(self, logits: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """Apply the logit bias and the penalties to the row in place; return what to put back."""
        if self._penalties is None and not self._bias.size:
            return None
        # Repeated ids are harmless (each copy gets the same value) and cheaper than making them unique.
        recent = np.fromiter(self._recent, dtype=np.intp, count=len(self._recent))
        touched = np.concatenate((recent, self._bias_ids)) if self._bias.size else recent
        saved = touched, logits[touched]
        if self._bias.size:
            np.add.at(logits, self._bias_ids, self._bias)  # in order, in float32, as llama.cpp's loop
        if recent.size:
            data = _candidates(recent, logits)
            _apply(self._penalties, data)  # counts only, no reordering
            logits[data["id"]] = data["logit"]
        return saved

    def _pick(self, ctx: Any, index: int, logits: np.ndarray[Any, Any]) -> tuple[int, bool]:
        """The chain's token for the (adjusted) row, and whether the chain has accepted it."""
        if self._greedy:
            return int(logits.argmax()), False
        ids = self._survivors(logits) if self._n_vocab >= _SURVIVORS_FROM else None
        if ids is not None:
            return _apply(self._chain, _candidates(ids, logits)), False
        if self._grammar is None:  # llama.cpp's copy of the row is faster than ours
            return int(llama_cpp.llama_sampler_sample(self._chain, ctx, index)), True
        return self._select_all(logits, grammar_first=False), False  # the grammar may reject it: no accept

    def _survivors(self, logits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
        """A superset of the tokens the truncation keeps, in vocabulary order; None: no cheap bound."""
        if self._top_k:
            n = logits.size - logits.size % _GROUPS
            groups = logits[:n].reshape(_GROUPS, -1)  # column j: tokens j, j + n/32, ...
            peaks = groups.max(axis=0)
            k = self._top_k
            if k >= peaks.size:  # a top-k of most of the vocabulary: no bound worth having
                return None
            # The k best column peaks are k tokens at or above `floor`, so each of the top k is too.
            floor = _kth_largest(peaks, k)
            columns = np.flatnonzero(peaks >= floor)
            rows, at = np.nonzero(groups[:, columns] >= floor)
            ids = rows * groups.shape[1] + columns[at]
            tail = np.flatnonzero(logits[n:] >= floor) + n
            ids = np.sort(np.concatenate((ids, tail)))
        elif self._min_p:
            peak = float(logits.max())
            # llama.cpp keeps logit >= peak + logf(min_p) in float32: a margin for the rounding.
            floor = peak + float(np.log(self._min_p)) - 1e-4 * (1.0 + abs(peak))
            ids = np.flatnonzero(logits >= floor)
        else:
            return None
        return ids if ids.size else None  # (NaN logits select nothing: the whole row decides)

    def _select_all(self, logits: np.ndarray[Any, Any], *, grammar_first: bool) -> int:
        if self._cur is None:
            self._cur = np.empty(self._n_vocab, dtype=_TOKEN_DATA)
        cur = self._cur
        cur["id"] = _ids(self._n_vocab)  # samplers reorder the data: refill it every time
        cur["logit"] = logits
        cur["p"] = 0.0
        if grammar_first:
            _apply(self._grammar, cur)
        return _apply(self._chain, cur)

    def close(self) -> None:
        if self._device is not None:
            ctx, seq, chain = self._device
            _set_sampler(ctx, seq, None)  # detached before it is freed (and before the slot's next owner)
            llama_cpp.llama_sampler_free(chain)
            self._device = None
        for name in ("_chain", "_grammar", "_penalties"):
            sampler = getattr(self, name)
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
                setattr(self, name, None)


def _kth_largest(values: np.ndarray[Any, Any], k: int) -> Any:
    """The k-th largest of `values`, partitioning only those that can be it (a partition of all
    8k column peaks costs more than the rest of the step)."""
    n = values.size - values.size % _GROUPS
    if k * _GROUPS <= n:
        tops = values[:n].reshape(_GROUPS, -1).max(axis=0)  # its k-th largest bounds ours from below
        values = values[values >= np.partition(tops, tops.size - k)[tops.size - k]]
    return np.partition(values, values.size - k)[values.size - k]


def _bind_set_sampler() -> Any:
    """`llama_set_sampler` (llama.h's backend sampling), which llama-cpp-python 0.3.36 does not bind."""
    if hasattr(llama_cpp, "llama_set_sampler"):  # a later binding
        return llama_cpp.llama_set_sampler
    function = getattr(llama_cpp.llama_cpp._lib, "llama_set_sampler", None)
    if function is None:
        return None
    function.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_int32, llama_cpp.llama_sampler_p_ctypes]
    function.restype = ctypes.c_bool
    return function


_set_sampler = _bind_set_sampler()


def logits_row(ctx: Any, index: int, n_vocab: int) -> np.ndarray[Any, Any]:
    """The logits at batch output `index`, as a writable view of llama.cpp's buffer (no copy)."""
    pointer = llama_cpp.llama_get_logits_ith(ctx, index)
    # (np.ctypeslib.as_array costs ~3x this, once per token.)
    return np.frombuffer(_floats(n_vocab).from_address(ctypes.addressof(pointer.contents)), dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _floats(n: int) -> Any:
    return ctypes.c_float * n


def _candidates(ids: np.ndarray[Any, Any], logits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    data = np.empty(ids.size, dtype=_TOKEN_DATA)
    data["id"] = ids
    data["logit"] = logits[ids]
    data["p"] = 0.0
    return data


def _apply(sampler: Any, data: np.ndarray[Any, Any]) -> int:
    """Run a llama.cpp sampler over `data` (in place); the selected token, or -1 if it selects none."""
    pointer = data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
    array = llama_cpp.llama_token_data_array(pointer, data.size, -1, False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
    if array.selected < 0:
        return -1
    return int(array.data[array.selected].id)  # samplers may move the data: read it from the array


def _penalised(r: GenerationRequest) -> bool:
    return r.repeat_penalty != 1.0 or bool(r.presence_penalty) or bool(r.frequency_penalty)


def _penalties(n_vocab: int, r: GenerationRequest) -> Any:
    return llama_cpp.llama_sampler_init_penalties(
        n_vocab, PENALTY_LAST_N, r.repeat_penalty, r.frequency_penalty, r.presence_penalty
    )


def reference_chain(n_vocab: int, request: GenerationRequest, history: list[int]) -> Any:
    """llama.cpp's whole chain for `request` (bias and penalties included, primed with `history`),
    to run with `llama_sampler_sample` over the whole vocabulary: what `Sampler` must match (the
    tests) and what it replaced (the benchmark). The caller frees it."""
    chain = _chain(n_vocab, request, adjust=True)
    if _penalised(request):
        for token in history[-PENALTY_LAST_N:]:
            llama_cpp.llama_sampler_accept(chain, token)
    return chain


def _chain(n_vocab: int, r: GenerationRequest, *, adjust: bool) -> Any:
    """llama-server's order: bias, penalties (`adjust`: else `Sampler` applies them), truncation,
    temperature, then the draw."""
    params = llama_cpp.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = llama_cpp.llama_sampler_chain_init(params)
    add = functools.partial(llama_cpp.llama_sampler_chain_add, chain)
    if adjust and r.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(r.logit_bias))(
            *(llama_cpp.llama_logit_bias(token, bias) for token, bias in r.logit_bias)
        )
        add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(r.logit_bias), biases))
    if adjust and _penalised(r):
        add(_penalties(n_vocab, r))
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
    # A seeded chain draws from its own RNG, so a request's draws do not depend on its neighbours;
    # given RANDOM_SEED, llama.cpp seeds it from the system's random device.
    seed = r.fixed_seed
    add(llama_cpp.llama_sampler_init_dist(seed if seed is not None else RANDOM_SEED))
    return chain


@functools.lru_cache(maxsize=4)
def _ids(n_vocab: int) -> np.ndarray[Any, Any]:
    return np.arange(n_vocab, dtype=np.int32)


def logprobs(
    ctx: Any, index: int, n_vocab: int, token: int, top: int, piece: Callable[[int], bytes]
) -> tuple[TokenLogprob, tuple[TokenLogprob, ...]]:
    """The chosen token's log-probability under the raw logits, and the `top` most likely ones
    (`piece`: a token's bytes)."""
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(n_vocab,))
    peak = float(logits.max())
    norm = peak + float(np.log(np.exp(logits - peak).sum()))
    chosen = TokenLogprob.of(piece(token), float(logits[token]) - norm)
    if top <= 0:
        return chosen, ()
    best = np.argpartition(logits, -top)[-top:]
    best = best[np.argsort(-logits[best])]
    return chosen, tuple(TokenLogprob.of(piece(int(t)), float(logits[t]) - norm) for t in best)


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
