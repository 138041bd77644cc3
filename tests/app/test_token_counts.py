"""`/tokenize` and Anthropic's `/v1/messages/count_tokens` count through one path (Generation.tokens):
the same prompt bound before the tokenizer runs, and the same count for the same conversation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from litestar.testing import TestClient

from tests.live import fake_app

CONTEXT = 512


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:  # type: ignore[type-arg]
    with fake_app({"LIGHT_MODEL_PATH": "fake/echo", "LIGHT_N_CTX": str(CONTEXT)}) as http:
        yield http


def test_an_oversized_prompt_is_refused_alike_before_the_tokenizer(client: TestClient) -> None:  # type: ignore[type-arg]
    huge = [{"role": "user", "content": "x" * (CONTEXT * 32 + 1)}]  # more characters than CONTEXT tokens can hold
    tokenize = client.post("/tokenize", json={"model": "light", "messages": huge})
    counted = client.post("/v1/messages/count_tokens", json={"model": "light", "messages": huge})
    assert tokenize.status_code == counted.status_code == 400, (tokenize.text, counted.text)
    fields = ("type", "param", "code")
    assert [tokenize.json()["error"][f] for f in fields] == [counted.json()["error"][f] for f in fields]
    assert counted.json()["error"]["code"] == "context_length_exceeded"


def test_one_conversation_counts_the_same_on_both_routes(client: TestClient) -> None:  # type: ignore[type-arg]
    messages = [{"role": "user", "content": "how many tokens is this?"}]
    tokenize = client.post("/v1/tokenize", json={"model": "light", "messages": messages})
    counted = client.post("/v1/messages/count_tokens", json={"model": "light", "messages": messages})
    assert tokenize.status_code == counted.status_code == 200, (tokenize.text, counted.text)
    assert tokenize.json()["max_model_len"] == CONTEXT
    assert counted.json()["input_tokens"] == tokenize.json()["count"] > 0
