"""A generation engine with no weights, for testing the app (auth, errors, cache, lifecycle,
metrics) in-process, as httpx's MockTransport stands in for the network. Never chosen by
settings: tests pass it to `create_app(engines=service.testing.fake_engines())`.

Tokens are UTF-8 bytes (ids 0-255) plus BOS and EOS; by default the reply is the last line of
the prompt, echoed back, so a test can tell from the answer that its prompt went through.
With `max_batch` > 1 the worker drives it as a continuous batch (`FakeBatch`), as it does the
real engines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from backends.base import IMAGE_MARKER, Backend, DecodeBatch, DecodeState, EngineInfo, GenerationRequest, Token
from kernel.config import TierSettings
from kernel.errors import LLMServiceError, ModelUnavailableError

BOS, EOS = 256, 257


def echo_last_line(prompt: str) -> str:
    return prompt.rstrip().rsplit("\n", 1)[-1].removeprefix("user: ")


class FakeBackend(Backend):
    name = "fake"
    reads_images = True

    def __init__(
        self,
        tier: TierSettings,
        model_path: str,
        *,
        reply: Callable[[str], str] = echo_last_line,
        token_seconds: float = 0.0,
        load_seconds: float = 0.0,
        fails_to_load: Callable[[str], bool] | None = None,
        max_batch: int = 1,
        sampling: Mapping[str, float] | None = None,
    ) -> None:
        """`reply`: the answer to a prompt's text; `token_seconds`: time spent on each token;
        `load_seconds`: time a load takes; `fails_to_load(model_path)`: True for a model that cannot
        load, as a corrupt file does with a real engine; `max_batch`: requests decoded together;
        `sampling`: the sampling defaults its model card gives (`EngineInfo.sampling`)."""
        self.tier = tier
        self.model_path = model_path
        self.reply = reply
        self.token_seconds = token_seconds
        self.load_seconds = load_seconds
        self.fails_to_load = fails_to_load
        self.loaded = False
        self.max_batch_size = max_batch
        self.sampling = dict(sampling or {})

    def load(self) -> None:
        if self.load_seconds:
            time.sleep(self.load_seconds)
        if self.fails_to_load is not None and self.fails_to_load(self.model_path):
            raise ModelUnavailableError(f"Cannot load {self.model_path}: not a model")
        self.loaded = True

    def info(self) -> EngineInfo:
        return EngineInfo("fake", "cpu", self.tier.n_ctx, vocab_size=EOS + 1, sampling=self.sampling)

    def read_card(self) -> Mapping[str, float]:
        return self.sampling

    def encode(self, text: str) -> list[int]:
        return [BOS, *text.encode()]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return bytes(t for t in tokens if t < BOS).decode(errors="replace")

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        lines = [f"{m['role']}: {m.get('content') or ''}" for m in messages]
        return "\n".join(lines) + "\n"

    def tokens(self, request: GenerationRequest) -> list[int]:
        """An image is read as its size and digest in place of its marker: the echo shows which."""
        prompt = super().tokens(request)
        if not request.images:
            return prompt
        parts = self.detokenize(prompt).split(IMAGE_MARKER)
        seen = [f"[image {i.width}x{i.height} {i.digest[:8]}]" for i in request.images]
        return self.encode("".join(p + (seen[k] if k < len(seen) else "") for k, p in enumerate(parts)))

    def decode(
        self, prompt: list[int], request: GenerationRequest, max_tokens: int, cancel: threading.Event | None = None
    ) -> Iterator[Token]:
        answer = self.reply(self.detokenize(prompt)).encode()
        for i in range(min(max_tokens, len(answer))):
            if cancel is not None and cancel.is_set():
                return
            if self.token_seconds:
                time.sleep(self.token_seconds)
            # One byte a token; a multi-byte character shows up on its last byte.
            text = answer[: i + 1].decode(errors="ignore")[len(answer[:i].decode(errors="ignore")) :]
            yield Token(text, final=i == len(answer) - 1)

    def open_batch(self) -> DecodeBatch:
        if self.max_batch_size <= 1:
            return super().open_batch()
        return FakeBatch(self)

    def close(self) -> None:
        self.loaded = False


class FakeBatch(DecodeBatch):
    """Each sequence's `FakeBackend.decode`, one token of every sequence per step."""

    def __init__(self, backend: FakeBackend) -> None:
        self._backend = backend
        self._tokens: dict[int, Iterator[Token]] = {}

    def add(self, key: int, state: DecodeState) -> None:
        self._tokens[key] = self._backend.decode(state.prompt, state.request, state.max_tokens)

    def step(self) -> list[tuple[int, Token | LLMServiceError | None]]:
        out: list[tuple[int, Token | LLMServiceError | None]] = []
        for key, tokens in list(self._tokens.items()):
            token = next(tokens, None)
            if token is None or token.final:
                del self._tokens[key]
            out.append((key, token))
        return out

    def remove(self, key: int) -> None:
        self._tokens.pop(key, None)
