"""Bounds on text size, applied before any tokenizer runs.

Engines tokenise on the model's own thread, and tokenising is linear in the text: a 5 MB prompt
held the chat tier 8 s before its `context_length_exceeded`, a 5 MB embedding input held the
embedding tier ~20 s (and grew the process by 600 MiB) only to be truncated to a few hundred
tokens. No tokenizer we serve averages more than `CHARS_PER_TOKEN` characters per token over real
text, so a prompt longer than that many characters per context token cannot fit, and an
embedding/rerank input can be cut to that many characters per model token without changing what
the model sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from backends.base import GenerationRequest
from kernel.errors import ContextLengthExceeded

CHARS_PER_TOKEN = 32


def check_prompt_length(request: GenerationRequest, context_length: int) -> None:
    """400 `context_length_exceeded` for a prompt that cannot fit `context_length` tokens."""
    if request.messages is not None:
        # Tool definitions and calls are rendered into the prompt too; their JSON bounds their text.
        param, size = "messages", len(msgspec.json.encode((request.messages, request.tools)))
    else:
        param, size = "prompt", len(request.prompt)
    if isinstance(request.prompt, list) and request.messages is None:
        if size >= context_length:
            raise ContextLengthExceeded(size, context_length, param=param)
    elif size > context_length * CHARS_PER_TOKEN:
        raise ContextLengthExceeded.of_characters(size, context_length, param=param)


def clip_texts(texts: Sequence[str], max_tokens: int) -> list[str]:
    """Cut inputs the model will truncate anyway to a length that still covers `max_tokens`."""
    budget = max_tokens * CHARS_PER_TOKEN
    return [t if len(t) <= budget else t[:budget] for t in texts]


def clip_token_ids(items: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """Token-id inputs cut to the same count (an id decodes to at least a byte of text)."""
    budget = max_tokens * CHARS_PER_TOKEN
    return [list(item[:budget]) for item in items]
