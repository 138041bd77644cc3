"""The one id maker: every object id the server hands out (completions, messages, responses, tool
calls, batches, files, documents) is a prefix and 24 random hex digits, as OpenAI's and Anthropic's
are; clients and SDKs check the prefixes, and the store's id patterns check the length."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    """`prefix` with its separator (`chatcmpl-`, `msg_`, `file-`) then 24 hex digits."""
    return prefix + secrets.token_hex(12)
