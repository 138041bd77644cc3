"""A generation engine with no weights, for testing the app (auth, errors, cache, lifecycle,
metrics) in-process, as httpx's MockTransport stands in for the network. Never chosen by
settings: tests pass it to `create_app(engines=service.testing.fake_engines())`.

Tokens are UTF-8 bytes (ids 0-255) plus BOS and EOS; by default the reply is the last line of
the prompt, echoed back, so a test can tell from the answer that its prompt went through.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from backends.base import Backend, EngineInfo, GenerationRequest, Token
from kernel.config import TierSettings

BOS, EOS = 256, 257


def echo_last_line(prompt: str) -> str:
    return prompt.rstrip().rsplit("\n", 1)[-1].removeprefix("user: ")


class FakeBackend(Backend):
    name = "fake"

    def __init__(
        self,
        tier: TierSettings,
        model_path: str,
        *,
        reply: Callable[[str], str] = echo_last_line,
        token_seconds: float = 0.0,
    ) -> None:
        """`reply`: the answer to a prompt's text; `token_seconds`: time spent on each token."""
        self.tier = tier
        self.model_path = model_path
        self.reply = reply
        self.token_seconds = token_seconds
        self.loaded = False

    def load(self) -> None:
        self.loaded = True

    def info(self) -> EngineInfo:
        return EngineInfo("fake", "cpu", self.tier.n_ctx, vocab_size=EOS + 1)

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

    def close(self) -> None:
        self.loaded = False
