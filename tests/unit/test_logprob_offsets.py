"""The legacy completions shape of logprobs, where a character spans several byte tokens."""

from __future__ import annotations

from backends.base import Token, TokenLogprob
from service.serving.chat import completion_logprobs


def test_text_offsets_follow_the_text_across_byte_tokens() -> None:
    """U+13000 is four byte tokens (F0 93 80 80): its text arrives with the last, and the next
    token starts one character later, not four."""
    pieces = [(b"\xf0", ""), (b"\x93", ""), (b"\x80", ""), (b"\x80", "\U00013000"), (b" a", " a")]
    scored = tuple(Token(text, logprob=TokenLogprob.of(raw, -0.5)) for raw, text in pieces)
    logprobs = completion_logprobs(scored, 3)
    assert logprobs is not None
    assert logprobs.text_offset == [3, 3, 3, 3, 4]
    assert logprobs.tokens == ["\ufffd"] * 4 + [" a"]
