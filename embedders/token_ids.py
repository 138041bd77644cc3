"""Token-id inputs: which tokenizer the ids come from.

OpenAI's embeddings API takes token ids of the *OpenAI* tokenizer, and LangChain's
`OpenAIEmbeddings` sends tiktoken `cl100k_base` ids by default. They mean nothing to the served
model's tokenizer, so they are decoded back to text with the encoding they came from; the
`bpe-openai` package ships the cl100k/o200k tables, so this works offline. `model` reads the ids
as the served model's own tokenizer ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from kernel.errors import InvalidRequestError, ModelUnavailableError

OPENAI_ENCODINGS = ("cl100k_base", "o200k_base")


@lru_cache(maxsize=2)
def _encoding(name: str) -> Any:
    try:
        import bpe_openai
    except ImportError:
        raise ModelUnavailableError(
            f"Token-id input needs the {name} tokenizer: pip install 'llmservice[embeddings]' (bpe-openai), "
            "or set EMBEDDING_TOKEN_IDS=model"
        ) from None
    return bpe_openai.build_encoding_from_name(name)


def openai_decoder(name: str) -> Callable[[Sequence[int]], str] | None:
    """A decoder for `name`, or None when the ids are the model's own (`model`)."""
    if name == "model":
        return None
    if name not in OPENAI_ENCODINGS:
        raise ModelUnavailableError(
            f"Invalid setting EMBEDDING_TOKEN_IDS={name!r}: expected one of: {', '.join(OPENAI_ENCODINGS)}, model"
        )
    encoding = _encoding(name)

    def decode(ids: Sequence[int]) -> str:
        try:
            return str(encoding.decode(list(ids)))
        except Exception as exc:  # the Rust tokenizer raises its own types for unknown ids
            raise InvalidRequestError(f"input has token ids that {name} does not know: {exc}", param="input") from None

    return decode
