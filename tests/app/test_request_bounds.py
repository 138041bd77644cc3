"""No single request can kill the server (issue 12, points 0 and 5): the bounds the app applies
before any engine sees a request, on the fake engines behind a live server (its log is the one
`python -m service` writes). tests/api/test_bounded_work.py keeps the bounds on real engines' work."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator

import httpx
import pytest

from service.testing import fake_engines
from tests.live import LiveServer, live_server

MSG = [{"role": "user", "content": "Hi"}]


def peak_rss_mib() -> float:
    """This process's peak resident memory: the live server runs in a thread of it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    env = {"LIGHT_MODEL_PATH": "fake/gemma-3-270m", "LIGHT_N_CTX": "256"}
    with live_server(env, wait_for=("light",), engines=fake_engines()) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def chat_with_schema(http: httpx.Client, schema: object) -> httpx.Response:
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    return http.post(
        "/v1/chat/completions",
        json={"model": "light", "messages": MSG, "max_tokens": 4, "response_format": response_format},
    )


def test_a_huge_schema_is_a_fast_400_and_memory_stays_flat(http: httpx.Client) -> None:
    before = peak_rss_mib()
    attacks = {
        "minItems": {"type": "array", "items": {"type": "integer"}, "minItems": 10**9},
        "enum": {"type": "object", "properties": {"k": {"enum": [f"v{i}" for i in range(20_000)]}}},
        "pattern": {"type": "string", "pattern": "^a{1000000000}$"},
        "$ref": {"type": "object", "properties": {"a": {"$ref": "#/$defs/nothing"}}},
        "remote": {"$ref": "https://example.com/schema.json"},
    }
    for name, schema in attacks.items():
        started = time.monotonic()
        res = chat_with_schema(http, schema)
        elapsed = time.monotonic() - started
        assert res.status_code == 400, (name, res.text)
        error = res.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert str(error["param"]).startswith("response_format.json_schema.schema")
        assert elapsed < 1.0, (name, elapsed)
    grown = peak_rss_mib() - before
    print(f"peak RSS grew {grown:.1f} MiB over {len(attacks)} hostile schemas")
    assert grown < 50
    # The tier still serves a small schema (that it constrains the answer: the engine suites).
    ok = chat_with_schema(http, {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "light", "messages": [{"role": "user", "content": "caf\xe9 \xff\xfe"}]}',
        b'{"model": "light", "messages": [{"role": "user", "content": "x"}], "extra": '
        + b"[" * 1000
        + b"]" * 1000
        + b"}",
        b'{"model": "light", "messages": ' + b'{"a":' * 600 + b"1" + b"}" * 600 + b"}",
    ],
    ids=["invalid-utf8", "nested-1000-arrays", "nested-600-objects"],
)
def test_malformed_bodies_are_400(http: httpx.Client, body: bytes, capfd: pytest.CaptureFixture[str]) -> None:
    res = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert res.status_code == 400, res.text
    error = res.json()["error"]
    assert error["type"] == "invalid_request_error" and len(error["message"]) < 300
    _, err = capfd.readouterr()
    assert "Traceback" not in err
