"""Small helpers for Hugging Face tokenizers shared by the torch-based engines."""

from __future__ import annotations

from typing import Any

from kernel.errors import InvalidRequestError


def count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    """Tokens per text including special tokens, before truncation (`verbose=False`: no warning
    per over-long text in the log)."""
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
    return [len(ids) for ids in encoded["input_ids"]]


def count_pair_tokens(tokenizer: Any, query: str, docs: list[str], max_tokens: int) -> int:
    """Total tokens the (query, doc) pairs of a rerank cost, after truncation to `max_tokens`."""
    if not docs:
        return 0
    encoded = tokenizer([query] * len(docs), docs, add_special_tokens=True, truncation=False, verbose=False)
    return sum(min(len(ids), max_tokens) for ids in encoded["input_ids"])


def decode_tokens(tokenizer: Any, ids: list[int]) -> str:
    size = len(tokenizer)
    bad = [i for i in ids if not 0 <= i < size]
    if bad:
        raise InvalidRequestError(
            f"Token id {bad[0]} is outside this model's vocabulary (0..{size - 1})", param="input"
        )
    text: str = tokenizer.decode(ids, skip_special_tokens=True)
    return text
