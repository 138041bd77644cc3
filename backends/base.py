"""The generation engine contract: neutral request/response types and one small ABC.

Engines implement four things (load, encode a prompt, render chat, decode tokens); the shared
`stream()` built on them does the context check, `max_tokens`, stop strings and usage, so both
engines behave identically at the HTTP surface. An engine that can decode several requests at
once also offers a `DecodeBatch`; the worker then drives each request through the same
`DecodeState` that `stream()` uses.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import msgspec

from backends.reasoning import ReasoningFormat, ThinkingBudget, reasoning_format
from backends.tools import ToolFormat
from kernel.config import SAMPLING_FIELDS, TierSettings
from kernel.errors import AdapterNotFoundError, ContextLengthExceeded, InvalidRequestError, LLMServiceError

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
# Prompt tokens scored per forward pass (`prompt_logprobs`): logits for every position of a chunk
# take chunk x vocabulary floats (64 x 262k for Gemma: 67 MB).
PROMPT_SCORE_CHUNK = 64


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Structured output: any JSON object, or JSON matching `schema`."""

    type: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = None


# llama.cpp's LLAMA_DEFAULT_SEED: `llama_sampler_init_dist` draws a random seed for it (as
# llama-server does for `seed: -1`); every engine and the response cache read it so.
RANDOM_SEED = 2**32 - 1


# Where an image goes in a rendered prompt: the serving layer writes it into a message's text in
# place of each image part, in order; an engine that takes images (mtmd) splits the prompt there.
# llama.cpp's own `mtmd_default_marker()`, so templates and llama-server see the same text.
IMAGE_MARKER = "<__media__>"


@dataclass(frozen=True, slots=True)
class ImageInput:
    """A decoded image: RGB pixels, row by row, 3 bytes each, and their digest (the prefix-cache key)."""

    width: int
    height: int
    rgb: bytes
    digest: str  # sha256 of the image file: equal images share KV across requests


@dataclass(frozen=True, slots=True)
class ImageSpan:
    """Where a prompt from `Backend.tokens` holds an image's places: one per embedding the image
    decodes into, holding no vocabulary id of meaning (llama.cpp: a negative id; MLX: the model's
    image placeholder). A tiled image may take several spans."""

    index: int | None  # which of the request's images, in order; None where the engine cannot tell
    start: int  # the first place, an index into the prompt's token list
    length: int


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """`messages` (rendered with the model's chat template) or `prompt` (text or token ids)."""

    prompt: str | list[int] = ""
    messages: tuple[dict[str, Any], ...] | None = None  # OpenAI-shaped: tool calls and results too
    tools: tuple[dict[str, Any], ...] | None = None  # OpenAI tool definitions, rendered into the prompt
    images: tuple[ImageInput, ...] = ()  # one per IMAGE_MARKER in the messages' text, in order
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    response_format: ResponseFormat | None = None
    logprobs: bool = False  # report each chosen token's log-probability
    top_logprobs: int = 0  # ... and this many most likely alternatives (needs logprobs)
    prompt_logprobs: bool = False  # score the prompt's tokens too (`echo` with `logprobs`)
    adapter: str | None = None  # a LoRA adapter loaded with `Backend.load_adapter`; None: the base model
    # Reasoning controls (service.serving.thinking maps each API's fields onto them): the chat template's
    # thinking switch (None: the template's default), at most this many thinking tokens before the
    # engine closes the block (None: no bound), and `chat_template_kwargs` for the template.
    thinking: bool | None = None
    thinking_budget: int | None = None
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    # Who the request is for (`prompt_cache_key`, else `user`): a remote tier sends one key's requests
    # to one upstream so its prefix cache hits. It cannot change the answer: not in the cache key.
    affinity: str | None = None

    @property
    def fixed_seed(self) -> int | None:
        """The seed that makes the draws repeat; None for random draws (no seed, or `RANDOM_SEED`)."""
        return None if self.seed == RANDOM_SEED else self.seed


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """A LoRA adapter an engine has loaded."""

    name: str
    path: str
    size_bytes: int
    rank: int | None = None  # where the files say it


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of generated text; the last chunk of a stream carries `finish_reason` and `usage`."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    stop_sequence: str | None = None  # on the final chunk: the stop string that ended generation
    scored: tuple[Token, ...] = ()  # with `logprobs`: the tokens this text came from, with their scores
    prompt_scored: tuple[Token, ...] = ()  # with `prompt_logprobs`, on the first chunk: the prompt's tokens


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log-probability under the model (before sampling), for `logprobs`."""

    token: str
    logprob: float
    raw: bytes  # the token's own bytes: part of a UTF-8 character for a byte token (then `token` has U+FFFD)

    @classmethod
    def of(cls, raw: bytes, logprob: float) -> TokenLogprob:
        return cls(raw.decode("utf-8", errors="replace"), logprob, raw)


@dataclass(frozen=True, slots=True)
class Token:
    """One decoded token as an engine yields it. `text` may be "" (a partial UTF-8 sequence)."""

    text: str
    cached_tokens: int = 0  # set on the first token: prompt tokens reused from a cache
    final: bool = False  # generation ended naturally here (a grammar completed), even at max_tokens
    logprob: TokenLogprob | None = None  # the chosen token, when the request asked for logprobs
    top_logprobs: tuple[TokenLogprob, ...] = ()  # the most likely alternatives, most likely first
    # On the first token, with `prompt_logprobs`: each prompt token scored by the model (the first
    # has no logprob: nothing comes before it).
    prompt: tuple[Token, ...] = ()


@dataclass(frozen=True, slots=True)
class EngineInfo:
    engine: str
    device: str
    context_length: int
    extras: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 0  # 0: unknown; token-id prompts are checked against it
    tool_format: ToolFormat = "hermes"  # how this model writes tool calls (backends.tools)
    reasoning: ReasoningFormat | None = None  # how it marks its thinking (backends.reasoning)
    # The model card's sampling defaults (`card_sampling`), by GenerationRequest field name.
    sampling: Mapping[str, float] = field(default_factory=dict)


def card_sampling(values: Mapping[str, object], where: str) -> dict[str, float]:
    """The sampling defaults a model card gives, by `SAMPLING_FIELDS` name (None: not given), each
    checked against the bounds of the tier setting of that name. A value that fails is left out
    with a warning, as llama.cpp skips one it cannot parse: the model still serves."""
    card: dict[str, float] = {}
    for name in SAMPLING_FIELDS:
        if (value := values.get(name)) is None:
            continue
        try:  # strict=False: GGUF metadata arrives as text ("0.6")
            card[name] = getattr(msgspec.convert({name: value}, TierSettings, strict=False), name)
        except msgspec.ValidationError as exc:
            log.warning("%s: the model card's %s=%r is ignored: %s", where, name, value, exc)
    return card


# Names a request's template variables may not set: the render's own inputs.
RESERVED_TEMPLATE_NAMES = frozenset(
    {
        "messages",
        "tools",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
        "chat_template",
        "tokenize",
        "conversation",
    }
)


def template_variables(request: GenerationRequest) -> dict[str, Any]:
    """What a chat template is rendered with besides the messages: `chat_template_kwargs`, and the
    thinking switch under the names templates read (`enable_thinking`: Qwen3 and most others;
    `thinking`: DeepSeek-V3.1), unless the client set those names itself."""
    variables = {k: v for k, v in request.template_kwargs if k not in RESERVED_TEMPLATE_NAMES}
    if request.thinking is not None:
        variables.setdefault("enable_thinking", request.thinking)
        variables.setdefault("thinking", request.thinking)
    return variables


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share (prefix reuse in the engines' KV caches).

    Runs on the model's thread at every admission, over every cached sequence: list slices compare
    at C speed (8k equal tokens: ~10x faster than a Python loop), galloping then halving onto the
    first difference."""
    if type(a) is not type(b) or not isinstance(a, list | tuple):  # slices must compare as equals
        a, b = list(a), list(b)
    n, step, size = 0, 16, min(len(a), len(b))
    while n + step <= size and a[n : n + step] == b[n : n + step]:
        n += step
        step *= 2
    while step > 1:  # the first difference (or the end) lies in [n, n + step)
        step //= 2
        if n + step <= size and a[n : n + step] == b[n : n + step]:
            n += step
    return n


class StopBuffer:
    """Holds back text that could still become a stop string, so clients never see half of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        self._pending += text
        if not self._stops:
            out, self._pending = self._pending, ""
            return out, False
        hits = [(i, s) for s in self._stops if (i := self._pending.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits)
            out = self._pending[:at]
            self._pending = ""
            return out, True
        # Emit all but the longest suffix that is a prefix of some stop string.
        keep = 0
        for n in range(min(self._hold, len(self._pending)), 0, -1):
            tail = self._pending[-n:]
            if any(s.startswith(tail) for s in self._stops):
                keep = n
                break
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class DecodeState:
    """One request on its way from tokens to chunks: stop strings, `max_tokens`, finish reason, usage.

    `Backend.stream()` and the batched worker loop both feed tokens through this, so a request
    ends, counts and reports exactly the same way whether or not it shared a batch.
    """

    def __init__(self, prompt: list[int], request: GenerationRequest, max_tokens: int) -> None:
        self.prompt = prompt
        self.request = request
        self.max_tokens = max_tokens
        self.count = 0
        self.cached = 0
        self.done = max_tokens <= 0  # no more tokens wanted
        self._stops = StopBuffer(request.stop)
        self._hit = False
        self._natural = False
        self._scored: list[Token] = []  # scored tokens whose text is still held back
        self._prompt_scored: tuple[Token, ...] = ()

    def add(self, token: Token) -> Chunk | None:
        """Take one decoded token; return the chunk that is now safe to send, if any."""
        if self.count == 0:
            self.cached = token.cached_tokens
            self._prompt_scored = token.prompt
        self.count += 1
        text, self._hit = self._stops.feed(token.text)
        self._natural = token.final
        self.done = self._hit or token.final or self.count >= self.max_tokens
        if token.logprob is not None:
            self._scored.append(token)
        if not text:
            return None
        scored, self._scored = tuple(self._scored), []
        return Chunk(text, scored=scored, prompt_scored=self._take_prompt())

    def _take_prompt(self) -> tuple[Token, ...]:
        """The prompt's scores, on whichever chunk goes out first."""
        scored, self._prompt_scored = self._prompt_scored, ()
        return scored

    def finish(self) -> list[Chunk]:
        """The closing chunks: text held back for a stop string that never came, then the final one.

        "length" only when `max_tokens` cut the output: not after a stop string, an end-of-
        generation token, or a grammar that completed on the last allowed token."""
        chunks = []
        if not self._hit and (tail := self._stops.flush()):
            chunks.append(Chunk(tail, scored=tuple(self._scored), prompt_scored=self._take_prompt()))
        length = self.count >= self.max_tokens and not (self._hit or self._natural)
        usage = Usage(len(self.prompt), self.count, self.cached)
        finish: FinishReason = "length" if length else "stop"
        stop = self._stops.matched
        chunks.append(Chunk("", finish, usage, stop, prompt_scored=self._take_prompt()))
        return chunks


class DecodeBatch(abc.ABC):
    """Several requests decoded together, one token each per step (continuous batching).

    Owned by the model's single worker thread, like its `Backend`. Sequences join with `add`
    between steps and leave when they end or with `remove`; the others carry on untouched.
    """

    @abc.abstractmethod
    def add(self, key: int, state: DecodeState) -> None:
        """Queue a sequence; raise `InvalidRequestError` (e.g. a bad schema) before it joins."""

    @abc.abstractmethod
    def step(self) -> list[tuple[int, Token | LLMServiceError | None]]:
        """Advance every sequence one step: `(key, token)` per token produced, `(key, None)` for a
        sequence that ended at an end-of-generation token, `(key, error)` for one that failed before
        producing anything (work done off the model's thread, e.g. compiling its grammar, failed).
        A sequence leaves the batch by itself after any of these but a token, or after its
        `max_tokens`-th token. A step may produce nothing (it processed part of a new prompt)."""

    @abc.abstractmethod
    def remove(self, key: int) -> None:
        """Drop a sequence (finished by a stop string, cancelled); unknown keys are ignored."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the batch's memory; called on the worker thread."""


class Backend(abc.ABC):
    """A loaded generation model. Not thread-safe: the registry gives each one a single worker."""

    name: str = "backend"
    reads_images = False  # an engine that takes `GenerationRequest.images` (one per IMAGE_MARKER) says so
    max_batch_size: int = 1  # > 1: `open_batch()` decodes that many requests together

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights; raise an `LLMServiceError` with a clear message on failure."""

    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    def read_card(self) -> Mapping[str, float] | None:
        """The model card's sampling defaults (`info().sampling` once loaded) read from the files
        without loading the weights, or None where this engine cannot."""
        return None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Tokenize a prompt, adding BOS unless the text already starts with it."""

    @abc.abstractmethod
    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of `tokens`, special tokens included (the inverse of `encode`)."""

    @abc.abstractmethod
    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """Apply the model's chat template and the assistant generation prompt, with `tools` offered
        to the model (in the template's own way, or `backends.tools.fold_tools` where it has none)
        and `variables` (`template_variables`: the thinking switch, chat_template_kwargs) set."""

    @abc.abstractmethod
    def decode(
        self, prompt: list[int], request: GenerationRequest, max_tokens: int, cancel: threading.Event | None = None
    ) -> Iterator[Token]:
        """Yield up to `max_tokens` generated tokens, ending early at end-of-generation.

        Closing the iterator must stop generation promptly (client disconnects); `cancel`, once
        set, should also cut a long prompt evaluation short (the iterator then just ends)."""

    def open_batch(self) -> DecodeBatch:
        """A batch decoder for up to `max_batch_size` requests (engines that can batch)."""
        raise NotImplementedError(f"The {self.name} engine decodes one request at a time")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model's memory."""

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Load a LoRA adapter that requests then name (`GenerationRequest.adapter`); on the model's
        thread. A file that does not fit the model is an `InvalidRequestError`."""
        raise InvalidRequestError(f"The {self.name} engine does not support LoRA adapters", param="adapter")

    def unload_adapter(self, name: str) -> None:  # noqa: B027 - optional hook
        """Free an adapter (on the model's thread, between batches); unknown names are ignored."""

    def adapter_names(self) -> list[str]:
        """The adapters loaded now."""
        return []

    def reset_prefix_cache(self) -> None:  # noqa: B027 - optional hook
        """Forget reusable prompt state (KV/prefix cache); called on the model's worker thread."""

    def speculative_stats(self) -> dict[str, int] | None:
        """Speculative decoding's counts since load: `drafted` and `accepted` tokens, and `fallbacks`
        (sequences decoded plainly although the tier speculates); None when it does not. Safe from any thread."""
        return None

    def prompt_cache_stats(self) -> dict[str, Any] | None:
        """The prompt cache's `misses` and, per tier (`ram`, `disk`), hits, evictions, entries and
        bytes (`backends.prompt_cache`); None without one. Safe from any thread."""
        return None

    def probe_reasoning(self, template: str | None, setting: str) -> ReasoningFormat | None:
        """The model's thinking markers, and whether its generation prompt opens them (rendered for
        a one-message chat with the template's default, and with its thinking switch on and off; a
        template that cannot render that opens nothing)."""

        def probe(thinking: bool | None) -> str:
            request = GenerationRequest(messages=({"role": "user", "content": "Hi"},), thinking=thinking)
            try:
                return self.render_chat(request.messages or (), None, template_variables(request)) if template else ""
            except Exception:  # any template failure here only means "not opened"
                return ""

        fmt = reasoning_format(template, setting, probe(None))
        if fmt is None:
            return None
        on, off = (reasoning_format(template, setting, probe(s)) for s in (True, False))
        return replace(
            fmt,
            opened_if_on=on.opened_by_prompt if on else None,
            opened_if_off=off.opened_by_prompt if off else None,
        )

    def tokens(self, request: GenerationRequest) -> list[int]:
        """The request's prompt as token ids: chat template and tools applied, BOS added once.
        Images need an engine that reads them (`reads_images`): never a prompt that left them out."""
        if request.images and not self.reads_images:
            raise InvalidRequestError(
                f"This model's {self.name} engine cannot read images yet; send text only", param="messages"
            )
        if request.messages is not None:
            return self.encode(self.render_chat(request.messages, request.tools, template_variables(request)))
        if isinstance(request.prompt, list):
            return request.prompt
        return self.encode(request.prompt)

    def image_spans(self, prompt: Sequence[int], images: Sequence[ImageInput]) -> list[ImageSpan]:
        """Where `prompt` (from `tokens`, for a request with these `images`) holds the images, in order."""
        return []

    def thinking_budget(self, prompt: Sequence[int], request: GenerationRequest) -> ThinkingBudget | None:
        """The request's thinking budget as a decoder enforces it; None where there is nothing to
        bound (no budget, a model without thinking markers, or a grammar, which leaves no room to think)."""
        fmt = self.info().reasoning
        if fmt is None or request.thinking_budget is None or request.response_format is not None:
            return None
        # This prompt's own end, not the probe's: a template's switch may add or drop the opening.
        inside = self.detokenize(prompt[-16:]).rstrip().endswith(fmt.open)
        start, close = self.encode(""), self.encode(fmt.close + "\n\n")
        if close[: len(start)] == start:  # the BOS that encode adds to a prompt
            close = close[len(start) :]
        return ThinkingBudget(fmt, request.thinking_budget, close, inside=inside)

    def check_adapter(self, request: GenerationRequest) -> None:
        """Refuse a request whose adapter is not loaded (unloaded after the request was accepted: an
        admin unload runs on the model's thread between batches, so the worker checks again there)."""
        if request.adapter is not None and request.adapter not in (loaded := self.adapter_names()):
            raise AdapterNotFoundError(request.adapter, "this model", loaded)

    def prepare(self, request: GenerationRequest) -> DecodeState:
        """Tokenize the request and check it against the context window.

        Reads only the template and the vocabulary, so the worker runs it off the model's thread
        (running streams never wait on a new prompt's rendering and tokenising)."""
        param = "prompt" if request.messages is None else "messages"
        self.check_adapter(request)
        prompt = self.tokens(request)
        info = self.info()
        context = info.context_length
        if isinstance(request.prompt, list) and info.vocab_size and max(prompt, default=0) >= info.vocab_size:
            # Out-of-range ids crash llama.cpp's decode and index garbage in MLX.
            raise InvalidRequestError(
                f"prompt has token id {max(prompt)}, outside this model's vocabulary of {info.vocab_size}",
                param="prompt",
            )
        if not prompt:
            raise InvalidRequestError("The prompt is empty.", param=param)
        if info.vocab_size and any(not 0 <= token < info.vocab_size for token, _ in request.logit_bias):
            raise InvalidRequestError(
                f"logit_bias names a token outside this model's vocabulary of {info.vocab_size}", param="logit_bias"
            )
        if len(prompt) >= context:
            raise ContextLengthExceeded(len(prompt), context, param=param)
        return DecodeState(prompt, request, min(request.max_tokens, context - len(prompt)))

    def stream(self, request: GenerationRequest, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """One request on its own: chunks of text, then a final chunk with finish reason and usage."""
        yield from self.stream_prepared(self.prepare(request), cancel)

    def stream_prepared(self, state: DecodeState, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """`stream` for a request `prepare` has already tokenised."""
        request = state.request
        tokens = self.decode(state.prompt, request, state.max_tokens, cancel)
        try:
            for token in tokens:
                if chunk := state.add(token):
                    yield chunk
                if state.done:
                    break
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
        yield from state.finish()
