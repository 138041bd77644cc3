"""Every error path answers the OpenAI envelope; model names route to tiers. The app in-process on
the fake engines, whose tokens are bytes: the light tier's model is named like the real one."""

from __future__ import annotations

import re
from collections.abc import Iterator

import openai
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from tests.live import error_of, fake_app

MSG = [{"role": "user", "content": "Hi"}]
Client = TestClient[Litestar]


@pytest.fixture(scope="module")
def http() -> Iterator[Client]:
    env = {"LIGHT_MODEL_PATH": "fake/gemma-3-270m", "LIGHT_N_CTX": "256", "MAX_BODY_BYTES": "200000"}
    with fake_app(env) as client:
        yield client


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": "hello"}, "messages"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),  # above the tier's queue (MAX_QUEUE 16)
        ({"stop": ["a"] * 17}, "stop"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
def test_invalid_chat_parameters_are_400(http: Client, change: dict[str, object], param: str) -> None:
    error = error_of(http.post("/v1/chat/completions", json={"model": "light", "messages": MSG, **change}), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_missing_model_field_is_400(http: Client) -> None:
    error = error_of(http.post("/v1/chat/completions", json={"messages": MSG}), 400)
    assert "model" in str(error["message"])


@pytest.mark.parametrize(
    "prompt", [[], ["a", "b"], [1.5], [{"x": 1}]], ids=["empty", "two-prompts", "floats", "objects"]
)
def test_invalid_prompts_are_400(http: Client, prompt: object) -> None:
    error_of(http.post("/v1/completions", json={"model": "light", "prompt": prompt}), 400)


def test_malformed_json_is_400(http: Client) -> None:
    res = http.post(
        "/v1/chat/completions", content=b'{"model": "light", ', headers={"content-type": "application/json"}
    )
    assert "JSON" in str(error_of(res, 400)["message"])


def test_unknown_fields_are_accepted(http: Client) -> None:
    body = {"model": "light", "messages": MSG, "max_tokens": 1, "logit_bias": {}, "parallel_tool_calls": False}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_unknown_route_and_wrong_method(http: Client) -> None:
    error_of(http.get("/v1/nothing-here"), 404)
    res = http.delete("/v1/chat/completions")
    error_of(res, 405)
    assert set(res.headers["allow"].replace(" ", "").split(",")) == {"POST", "OPTIONS"}


def test_body_too_large_is_413(http: Client) -> None:
    error_of(http.post("/v1/completions", json={"model": "light", "prompt": "x" * 300_000}), 413)


def test_unknown_model_lists_available(http: Client) -> None:
    error = error_of(http.post("/v1/chat/completions", json={"model": "gpt-17", "messages": MSG}), 404)
    assert error["code"] == "model_not_found" and "light/gemma-3-270m" in str(error["message"])


def test_tier_without_model(http: Client) -> None:
    error = error_of(http.post("/v1/chat/completions", json={"model": "heavy", "messages": MSG}), 404)
    assert error["message"] == "No models available for tier: heavy" and error["type"] == "model_error"


def test_context_length_exceeded_names_both_numbers(http: Client) -> None:
    error = error_of(http.post("/v1/completions", json={"model": "light", "prompt": "word " * 400}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    context, prompt = map(int, re.findall(r"(\d+) tokens", str(error["message"])))
    assert context == 256 and prompt > 400


@pytest.mark.parametrize(
    "model", ["light", "LIGHT", "light/gemma-3-270m", "light/anything", "gemma-3-270m", "light/gemma-3-270m", "270m"]
)
def test_routing_to_the_light_tier(http: Client, model: str) -> None:
    res = http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1})
    assert res.status_code == 200, res.text
    assert res.json()["model"] == model


@pytest.mark.parametrize(
    ("model", "tier"),
    [
        ("text-embedding-3-small", "embedding"),
        ("bge-m3", "embedding"),
        ("multilingual-e5-large", "embedding"),
        ("bge-reranker-v2-m3", "reranker"),
        ("cross-encoder/ms-marco", "reranker"),
        ("qwen-7b", None),
    ],
)
def test_routing_by_name_pattern(http: Client, model: str, tier: str | None) -> None:
    res = http.post("/v1/chat/completions", json={"model": model, "messages": MSG})
    error = error_of(res, 404)
    if tier is None:  # no tier has a 7b model
        assert error["code"] == "model_not_found"
    else:
        assert error["message"] == f"No models available for tier: {tier}"


def test_model_details_and_health(http: Client) -> None:
    card = http.get("/v1/models/light/gemma-3-270m").json()
    assert card["id"] == "light/gemma-3-270m" and card["engine"] == "fake" and card["status"] == "loaded"
    error_of(http.get("/v1/models/nope"), 404)
    health = http.get("/health").json()
    assert health["status"] == "healthy" and "timestamp" in health
    assert health["tiers"]["light"]["state"] == "loaded" and health["tiers"]["light"]["device"] == "cpu"


def test_cors_preflight(http: Client) -> None:
    res = http.options(
        "/v1/chat/completions",
        headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"},
    )
    assert res.status_code in (200, 204)
    assert res.headers["access-control-allow-origin"] == "http://localhost:3000"  # other origins: test_browser_safety


def test_sdk_raises_typed_errors(http: Client) -> None:
    client = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="x", http_client=http, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="light", messages=MSG, temperature=3)  # type: ignore[arg-type]


def test_small_contract_fixes(http: Client) -> None:
    """Issue 12 point 6: strict booleans, bounded seeds, short echoes, an explicit cache target."""
    for change, param in (({"stream": 1}, "stream"), ({"max_tokens": "5"}, "max_tokens"), ({"seed": 2**32}, "seed"),
                          ({"seed": -1}, "seed")):  # fmt: skip
        error = error_of(http.post("/v1/chat/completions", json={"model": "light", "messages": MSG, **change}), 400)
        assert error["param"] == param, change
    assert http.post("/v1/chat/completions", json={"model": "light", "messages": MSG, "max_tokens": 1,
                                                   "seed": 2**32 - 1}).status_code == 200  # fmt: skip
    error = error_of(http.post("/v1/chat/completions", json={"model": "m" * 100_000, "messages": MSG}), 404)
    assert len(str(error["message"])) < 300
    error = error_of(http.post("/v1/cache/clear"), 400)  # no longer clears everything
    assert "JSON request body" in str(error["message"])
    assert "target" in str(error_of(http.post("/v1/cache/clear", json={}), 400)["message"])
