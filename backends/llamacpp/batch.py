"""Continuous batching for the llama.cpp engine: sequences and the decode step.

Each step puts one token of every generating sequence and then up to `N_BATCH` minus that many
prompt tokens of joining sequences into one `llama_decode`, so a long new prompt is prefilled in
chunks while the running streams keep flowing. Each sequence decodes in a KV slot (`kv_slots`).

A prompt is prefilled once however many sequences share it: a sequence whose prompt starts with
what another is prefilling right now (`n` > 1 choices, one system prompt for many users) waits for
that prefix and then shares its cells. A `response_format` grammar compiles on another thread
while the prompt prefills: only the prompt's last token, whose logits are sampled, waits for it.

LoRA adapters are set per context in llama.cpp, not per sequence, so one step decodes only the
sequences of one adapter (or of none): the sequences sharing an adapter share a batch, and the
groups take turns of `TURN_STEPS` steps, the group that waited longest going next.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from backends.base import (
    PROMPT_SCORE_CHUNK,
    DecodeBatch,
    DecodeState,
    GenerationRequest,
    Token,
    TokenLogprob,
    common_prefix,
)
from backends.llamacpp.adapters import LoraAdapters
from backends.llamacpp.draft import DraftModel
from backends.llamacpp.kv_slots import KvSlot, KvSlots
from backends.llamacpp.native_batch import TokenBatch
from backends.llamacpp.sampling import GrammarCompiler, Sampler, TextStream, free_sampler, logprobs
from backends.llamacpp.speculative import DraftLength, SpeculativeStats, ngram_draft
from backends.llamacpp.vision import Vision, VisionPrompt, image_places
from backends.reasoning import ThinkingBudget
from kernel.errors import EngineError, InvalidRequestError, LLMServiceError

TURN_STEPS = 4  # steps an adapter group keeps the context while others wait (a switch costs a re-reserve)
GRAMMAR_TIMEOUT = 10.0  # seconds a response_format may take to compile before the request is a 400
_GRAMMAR_POLL = 0.05  # how long an otherwise idle step waits for a grammar to compile
PIECE_BUFFER = 256  # bytes for a token's piece; a longer piece grows it

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelHandle:
    """What a batch needs of its loaded model: the native handles and the model's helpers.

    The backend hands this over rather than itself, so the batch never reaches back into its owner.
    """

    context: Any  # the llama_context
    vocab: Any  # the llama_vocab
    n_vocab: int
    eos: int  # -1: none
    n_batch: int  # tokens one llama_decode takes
    kv_slots: KvSlots
    adapters: LoraAdapters
    grammars: GrammarCompiler
    thinking_budget: Callable[[Sequence[int], GenerationRequest], ThinkingBudget | None]
    device_sampling: bool = False  # sample in the decode graph the requests that allow it
    speculative: str = "off"  # "ngram": draft by prompt lookup (`speculative`); "draft": by `draft`
    draft_tokens: int = 8  # most tokens one sequence drafts per step
    speculative_stats: SpeculativeStats | None = None
    vision: Vision | None = None  # the projector, for prompts with images (`vision`)
    draft: DraftModel | None = None  # the draft model of "draft"


@dataclass(slots=True, eq=False)
class _Sequence:
    key: int
    state: DecodeState
    slot: KvSlot
    reused: int
    sampler: Sampler
    text: TextStream = field(default_factory=TextStream)
    fed: int = 0  # prompt tokens in the KV
    next_token: int | None = None  # sampled, shown, not yet in the KV
    count: int = 0
    grammar: Future[Any] | None = None  # compiling off the model's thread
    grammar_since: float = 0.0
    prompt_scores: list[Token] = field(default_factory=list)  # with prompt_logprobs
    thinking: ThinkingBudget | None = None  # a thinking budget to enforce
    leader: _Sequence | None = None  # prefilling the first `shared` tokens of this prompt: wait, then share
    shared: int = 0
    draft_length: DraftLength | None = None  # speculating (see `speculative`)
    drafts: list[int] = field(default_factory=list)  # drafted tokens in this step's batch, after next_token

    @property
    def adapter(self) -> str | None:
        return self.state.request.adapter

    def prefill_limit(self) -> int:
        """Prompt tokens that may go into the KV now: all but the last while the grammar compiles
        (the last token's logits are sampled, and sampling needs the grammar)."""
        return len(self.state.prompt) - (self.grammar is not None)

    def text_so_far(self) -> list[int]:
        """What the KV holds and the token sampled after it: what a draft continues."""
        assert self.next_token is not None
        return [*self.slot.tokens, self.next_token]

    def has_work(self) -> bool:
        """A token to feed, or prompt left to evaluate (not while another sequence prefills it)."""
        return self.next_token is not None or (self.leader is None and self.fed < self.prefill_limit())


class LlamaCppBatch(DecodeBatch):
    """Sequences decoded together through one `llama_decode` per step (see the module docstring)."""

    def __init__(self, handle: ModelHandle) -> None:
        self._handle = handle
        self._ctx = handle.context
        self._vocab = handle.vocab
        self._n_vocab = handle.n_vocab
        self._capacity = handle.n_batch
        self._batch = TokenBatch(self._capacity)
        self._piece = ctypes.create_string_buffer(PIECE_BUFFER)
        self._sequences: dict[int, _Sequence] = {}  # in arrival order
        self._group: str | None = None  # the adapter whose sequences the last step decoded
        self._turn = 0  # steps that group has had in a row
        self._clock = itertools.count()
        self._last_ran: dict[str | None, int] = {}  # adapter group -> step it last ran

    # -- joining and leaving -----------------------------------------------------------------

    def add(self, key: int, state: DecodeState) -> None:
        request, prompt = state.request, state.prompt
        handle = self._handle
        images = isinstance(prompt, VisionPrompt)
        if images and request.prompt_logprobs:
            raise InvalidRequestError("prompt_logprobs cannot score a prompt with images", param="logprobs")
        # An image's places are no tokens: the penalties count the text around them.
        sampler = Sampler(self._vocab, self._n_vocab, request, [t for t in prompt if t >= 0] if images else prompt)
        grammar = None
        if request.response_format is not None:
            try:
                grammar = handle.grammars.submit(request.response_format)
            except BaseException:
                sampler.close()
                raise
        slot, reused = handle.kv_slots.acquire(prompt, request.adapter)
        seq = _Sequence(key, state, slot, reused, sampler, fed=reused, grammar=grammar)
        seq.thinking = handle.thinking_budget(prompt, request)
        # Logprobs, grammars and forced tokens need the logits row on the host.
        # (An image's embeddings go in a decode of their own, not the graph a device sampler joins.)
        host = request.logprobs or request.prompt_logprobs or grammar is not None or seq.thinking is not None or images
        offloaded = handle.device_sampling and not host and sampler.offload(self._ctx, slot.seq)
        if handle.speculative != "off":
            # A sampler in the decode graph draws one token per sequence: no drafts to verify.
            if offloaded:
                log.info("Sequence %d decodes without speculation: it samples on the device", key)
                if handle.speculative_stats is not None:
                    handle.speculative_stats.fallback()
            else:
                seq.draft_length = DraftLength(handle.draft_tokens)
        if request.prompt_logprobs:
            # Every prompt token is scored from its own logits: nothing comes from the KV cache.
            handle.kv_slots.wipe(slot)
            seq.reused = seq.fed = 0
            seq.prompt_scores.append(Token(self.piece_text(prompt[0])))
        else:
            self._follow(seq)
        seq.grammar_since = time.monotonic()
        self._sequences[key] = seq

    def _follow(self, seq: _Sequence) -> None:
        """Make `seq` wait for the sequence prefilling the longest part of its prompt right now."""
        if seq.adapter is not None:  # KV computed with an adapter is not shared (see kv_slots)
            return
        prompt = seq.state.prompt
        for other in self._sequences.values():
            if other.adapter is not None:
                continue
            # One token at least is left to each for its own logits; what `other` holds already,
            # `acquire` has shared.
            n = min(common_prefix(other.state.prompt, prompt), len(prompt) - 1, len(other.state.prompt) - 1)
            if n > max(seq.fed, seq.shared, other.fed):
                seq.leader, seq.shared = other, n

    def _share(self, seq: _Sequence, leader: _Sequence, n: int) -> None:
        """Stop waiting for `leader`; take the first `n` prompt tokens from its cells if that is more
        than `seq` holds."""
        seq.leader = None
        if n > seq.fed:
            self._handle.kv_slots.share(leader.slot, seq.slot, n)  # empties the slot if it fails
            seq.fed = seq.reused = len(seq.slot.tokens)

    def remove(self, key: int) -> None:
        seq = self._sequences.pop(key, None)
        if seq is not None:
            self._leave(seq)

    def _leave(self, seq: _Sequence) -> None:
        if seq.grammar is not None and not seq.grammar.cancel():
            seq.grammar.add_done_callback(free_sampler)  # compiled for nobody: free it when done
        seq.sampler.close()
        # The slot keeps what its KV holds (prompt and output so far) for the next request.
        self._handle.kv_slots.release(seq.slot)
        for follower in self._sequences.values():
            if follower.leader is seq:  # it left before prefilling all that was shared: take what it did
                self._share(follower, seq, min(seq.fed, follower.shared))

    def close(self) -> None:
        for seq in list(self._sequences.values()):
            self._leave(seq)
            self._handle.kv_slots.drop(seq.slot)
        self._sequences.clear()

    def pending(self, key: int) -> bool:
        """Whether `key` is still in the batch (it leaves by itself at its end)."""
        return key in self._sequences

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> list[tuple[int, Token | LLMServiceError | None]]:
        out: list[tuple[int, Token | LLMServiceError | None]] = []
        self._grammars_ready(out)
        for seq in self._sequences.values():
            if seq.leader is not None and seq.leader.fed >= seq.shared:
                self._share(seq, seq.leader, seq.shared)
        batch, outputs = self._batch, []
        n = 0
        # In slot order: llama.cpp puts only consecutive streams into one ubatch (split_equal).
        sequences = sorted(self._turn_sequences(), key=lambda s: s.slot.seq)
        self._draft([s for s in sequences if s.next_token is not None])
        for seq in sequences:
            if seq.next_token is not None:
                pos = seq.slot.position(len(seq.slot.tokens))
                batch.set(n, seq.next_token, pos, seq.slot.seq, True)
                outputs.append((n, seq))
                n += 1
                if seq.drafts:  # verified in this decode: logits on each
                    batch.set_run(n, seq.drafts, pos + 1, seq.slot.seq, True, every=True)
                    n += len(seq.drafts)
        decoding = n
        chunks: list[tuple[_Sequence, int, int]] = []  # (sequence, first batch index, tokens)
        kv_slots = self._handle.kv_slots
        for seq in sequences:
            if self._image(seq):
                # One image a step: each sequence's first token comes once its own image is read, and
                # the streams already decoding get a token between encodes, instead of all waiting
                # for every image that joined at once (llama-server reads them one at a time too).
                break
        # Room for the filler tokens of idle streams between these (see `_order`), if prompts leave it.
        longest = max((len(s.slot.tokens) for s in sequences), default=0) + self._capacity
        spare = len(kv_slots.fillers({s.slot.seq for s in sequences}, self._capacity, longest))
        capacity = self._capacity - spare if self._capacity - spare > n else self._capacity
        for seq in sequences:
            if n >= capacity:
                break
            prompt, limit = seq.state.prompt, seq.prefill_limit()
            if seq.next_token is not None or seq.leader is not None or seq.fed >= limit:
                continue
            every = seq.state.request.prompt_logprobs
            room = min(capacity - n, PROMPT_SCORE_CHUNK) if every else capacity - n
            take = min(room, limit - seq.fed)
            if isinstance(prompt, VisionPrompt):  # text up to the next image, evaluated on its own
                take = min(take, min((i for i in prompt.images if i >= seq.fed), default=limit) - seq.fed)
                if take <= 0:
                    continue
            if kv_slots.checkpointing:  # a window moves past what a follower shares: stop there for it
                waiting = [f.shared for f in self._sequences.values() if f.leader is seq and f.shared > seq.fed]
                take = min(take, min(waiting, default=seq.fed + take) - seq.fed)
            mark = kv_slots.checkpoint_at(len(prompt))
            if mark is not None and seq.fed < mark < seq.fed + take:
                take = mark - seq.fed  # the step ends where the prompt is checkpointed
            last = seq.fed + take == len(prompt)
            start = seq.slot.position(seq.fed)
            batch.set_run(n, prompt[seq.fed : seq.fed + take], start, seq.slot.seq, last, every=every)
            if last:
                outputs.append((n + take - 1, seq))
            chunks.append((seq, n, take))
            n += take
        if n == 0:
            self._wait_for_grammars()
            return out
        present = {seq.slot.seq for _, seq in outputs} | {seq.slot.seq for seq, _, _ in chunks}
        fillers = kv_slots.fillers(present, self._capacity - n, int(batch.pos[:n].max()) + 1)
        # Tokens to decode, then prompt runs, each in slot order: without fillers, only both together
        # may be out of stream order (and the reordering costs a decoding stream ~10 us a token).
        if fillers or (decoding and chunks):
            outputs, chunks = self._order(n, fillers, outputs, chunks)
        n += len(fillers)
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, batch.struct)
        kv_slots.unfill(fillers)
        if rc != 0:
            raise EngineError(f"llama_decode failed with status {rc} on a batch of {n} tokens")
        for _, seq in outputs:
            if seq.next_token is not None:
                seq.slot.tokens.append(seq.next_token)
        for seq, start, take in chunks:
            if seq.state.request.prompt_logprobs:
                self._score_prompt(seq, start, take)
            seq.slot.tokens.extend(seq.state.prompt[seq.fed : seq.fed + take])
            seq.fed += take
            if seq.fed == kv_slots.checkpoint_at(len(seq.state.prompt)):
                kv_slots.checkpoint(seq.slot)
        for index, seq in outputs:
            if seq.drafts:
                self._verify(seq, index, out)
            else:
                out.append((seq.key, self._sample(seq, index)))
        return out

    def _image(self, seq: _Sequence) -> bool:
        """Evaluate the image `seq`'s prefill has reached, if it has (True): the projector encodes it
        and its embeddings go into the sequence's KV, in a decode of their own (a `llama_batch` takes
        tokens or embeddings, not both)."""
        prompt = seq.state.prompt
        if (
            not isinstance(prompt, VisionPrompt)
            or seq.next_token is not None
            or seq.leader is not None
            or seq.fed >= seq.prefill_limit()
            or (chunk := prompt.images.get(seq.fed)) is None
        ):
            return False
        vision = self._handle.vision
        if vision is None:
            raise EngineError("a prompt with images reached a model without its projector")
        after = vision.evaluate(self._ctx, chunk, seq.slot.position(seq.fed), seq.slot.seq, self._capacity)
        end = seq.fed + image_places(chunk)
        seq.slot.tokens.extend(prompt[seq.fed : end])
        seq.slot.shift_after_image(end, after)  # M-RoPE: fewer positions than places
        seq.fed = end
        kv_slots = self._handle.kv_slots
        if seq.fed == kv_slots.checkpoint_at(len(prompt)):
            kv_slots.checkpoint(seq.slot)
        return True

    def _draft(self, decoding: list[_Sequence]) -> None:
        """Set the tokens each speculating sequence verifies after its next token this step."""
        room = self._capacity - len(decoding)  # rows the batch has beside one token per sequence
        wants: list[tuple[_Sequence, int]] = []
        for seq in decoding:
            if seq.draft_length is None:
                continue
            # No more than the batch has room for, nor than could still be output (k accepted drafts
            # yield k + 1 tokens), which also keeps them inside the sequence's context.
            k = min(seq.draft_length.next(), room, seq.state.max_tokens - seq.count - 1)
            if k > 0:
                wants.append((seq, k))
                room -= k
        if self._handle.draft is None:
            for seq, k in wants:
                draft = ngram_draft(seq.text_so_far(), k)
                # A match before an image would propose its places, which are no tokens.
                seq.drafts = next((draft[:i] for i, t in enumerate(draft) if t < 0), draft)
            return
        # The draft model reads tokens only: a sequence with images decodes without its drafts.
        wants = [(seq, k) for seq, k in wants if not isinstance(seq.state.prompt, VisionPrompt)]
        if not wants:
            return
        proposals = self._handle.draft.propose([(seq.slot.seq, seq.text_so_far(), k) for seq, k in wants])
        for (seq, _), drafts in zip(wants, proposals, strict=True):
            seq.drafts = drafts

    def _verify(self, seq: _Sequence, index: int, out: list[tuple[int, Token | LLMServiceError | None]]) -> None:
        """Sample `seq` at its next token's logits and then at each draft's while the draft equals
        what was sampled before it (exact: see `speculative`); drop the KV of the drafts rejected."""
        drafts, seq.drafts = seq.drafts, []
        accepted = 0
        out.append((seq.key, self._sample(seq, index)))
        for token in drafts:
            if self._sequences.get(seq.key) is not seq or seq.next_token != token:
                break  # it ended, or sampled something else: the rest of the draft is wrong
            seq.slot.tokens.append(token)
            accepted += 1
            out.append((seq.key, self._sample(seq, index + accepted)))
        if accepted < len(drafts):
            mem = llama_cpp.llama_get_memory(self._ctx)
            if not llama_cpp.llama_memory_seq_rm(mem, seq.slot.seq, seq.slot.position(len(seq.slot.tokens)), -1):
                raise EngineError("llama.cpp could not remove the KV of rejected draft tokens")
        if seq.draft_length is not None:
            seq.draft_length.update(len(drafts), accepted)
        if self._handle.speculative_stats is not None:
            self._handle.speculative_stats.add(len(drafts), accepted)

    def _order(
        self,
        n: int,
        fillers: list[tuple[int, int, int]],
        outputs: list[tuple[int, _Sequence]],
        chunks: list[tuple[_Sequence, int, int]],
    ) -> tuple[list[tuple[int, _Sequence]], list[tuple[_Sequence, int, int]]]:
        """Put the step's tokens in stream order, with a filler token for each idle stream between
        (`KvSlots.fillers`): llama.cpp evaluates only consecutive streams, in batch order, in one
        graph (split_equal), so streams 0, 2, 3 alone would cost two. Returns outputs and chunks
        at their new batch indices."""
        batch = self._batch
        for i, (seq, pos, token) in enumerate(fillers):
            batch.set(n + i, token, pos, seq, False)
        total = n + len(fillers)
        order = np.argsort(batch.seq[:total], kind="stable")  # a sequence's prompt run stays in one piece
        batch.permute(order)
        where = np.empty(total, dtype=np.intp)
        where[order] = np.arange(total)
        return [(int(where[i]), s) for i, s in outputs], [(s, int(where[start]), take) for s, start, take in chunks]

    def _turn_sequences(self) -> list[_Sequence]:
        """The sequences this step decodes, all of one adapter group, with that adapter set: the
        current group for up to `TURN_STEPS` steps while others wait (longer when alone), then
        the group that has waited longest."""
        ready = [s for s in self._sequences.values() if s.has_work()]
        groups = list(dict.fromkeys(s.adapter for s in ready))
        if not groups:
            return []
        if self._group in groups and (len(groups) == 1 or self._turn < TURN_STEPS):
            self._turn += 1
        else:
            self._group = min(groups, key=lambda g: self._last_ran.get(g, -1))
            self._turn = 1
        self._last_ran[self._group] = next(self._clock)
        if len(self._last_ran) > 4 * len(groups) + 8:  # forget groups long gone
            self._last_ran = {g: self._last_ran[g] for g in groups if g in self._last_ran}
        self._handle.adapters.apply(self._ctx, self._group)
        return [s for s in ready if s.adapter == self._group]

    def _score_prompt(self, seq: _Sequence, start: int, take: int) -> None:
        """Each position's logits score the prompt token after it."""
        prompt, top = seq.state.prompt, seq.state.request.top_logprobs
        for j in range(take):
            at = seq.fed + j + 1
            if at < len(prompt):
                chosen, best = logprobs(self._ctx, start + j, self._n_vocab, prompt[at], top, self.piece)
                seq.prompt_scores.append(Token(chosen.token, logprob=chosen, top_logprobs=best))

    def _sample(self, seq: _Sequence, index: int) -> Token | None:
        forced = seq.thinking.forced() if seq.thinking is not None else None
        if forced is None:
            token = seq.sampler.sample(self._ctx, index)
        else:  # the thinking budget is spent: its close marker goes in as if sampled
            token = forced
            seq.sampler.accept(token)
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(seq)
            return None
        seq.count += 1
        request = seq.state.request
        piece = self.piece(token)
        # As in llama-server, a structured value ends when the model samples the end (above; the
        # grammar allows nothing else once the value cannot go on). A JSON value that is complete
        # with whitespace after it can only be followed by more whitespace: it ends there too.
        eos = self._handle.eos
        final = request.response_format is not None and piece[-1:].isspace() and eos >= 0 and seq.sampler.allows(eos)
        done = final or seq.count >= seq.state.max_tokens
        chosen: TokenLogprob | None = None
        top: tuple[TokenLogprob, ...] = ()
        if request.logprobs:
            chosen, top = logprobs(self._ctx, index, self._n_vocab, token, request.top_logprobs, self.piece)
        if seq.thinking is not None:
            seq.thinking.observe(piece.decode("utf-8", errors="replace"))
        text = seq.text.add(piece, final=done)
        if final:  # the whitespace after the value is no part of it
            text = text.rstrip(" \t\r\n")
        first = seq.count == 1
        result = Token(
            text,
            cached_tokens=seq.reused if first else 0,
            final=final,
            logprob=chosen,
            top_logprobs=top,
            prompt=tuple(seq.prompt_scores) if first else (),
        )
        if done:
            self._finish(seq)
        else:
            seq.next_token = token
        return result

    def _finish(self, seq: _Sequence) -> None:
        seq.next_token = None
        del self._sequences[seq.key]
        self._leave(seq)

    def piece(self, token: int) -> bytes:
        """The token's bytes (part of a UTF-8 character for a byte token)."""
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:  # longer than the buffer: -n is its length
            self._piece = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n]

    def piece_text(self, token: int) -> str:
        return self.piece(token).decode("utf-8", errors="replace")

    # -- grammars ----------------------------------------------------------------------------

    def _grammars_ready(self, out: list[tuple[int, Token | LLMServiceError | None]]) -> None:
        now = time.monotonic()
        for seq in list(self._sequences.values()):
            future = seq.grammar
            if future is None:
                continue
            error: LLMServiceError | None = None
            if future.done():
                seq.grammar = None
                exc = future.exception()
                if exc is None:
                    seq.sampler.attach_grammar(future.result())
                    continue
                error = (
                    exc
                    if isinstance(exc, LLMServiceError)
                    else InvalidRequestError(f"The JSON schema could not be compiled: {exc}", param="response_format")
                )
            elif now - seq.grammar_since > GRAMMAR_TIMEOUT:
                error = InvalidRequestError(
                    f"response_format: the JSON schema took more than {GRAMMAR_TIMEOUT:.0f} s to compile; simplify it",
                    param="response_format",
                )
            if error is not None:
                self._finish(seq)
                out.append((seq.key, error))

    def _wait_for_grammars(self) -> None:
        futures = [s.grammar for s in self._sequences.values() if s.grammar is not None]
        if futures:
            wait(futures, timeout=_GRAMMAR_POLL, return_when=FIRST_COMPLETED)
