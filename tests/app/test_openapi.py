"""The OpenAPI document (`/schema/openapi.json`) and a bounded schemathesis run against it.

The fuzz run is the document's contract: the real app (default security) on the fake engines, the
light tier named like Gemma (the document and the wire are the app's; the engines' contracts are
tests/engines' and tests/api's), requests generated from the document, answers checked against it:
never a 5xx, only documented statuses, content types, headers and bodies, and bodies that break the
schema refused with a 4xx. Generating the requests is the cost (about a minute per mode), not serving them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from litestar.testing import TestClient
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import parse_settings
from service.testing import fake_engines
from tests.live import LiveServer, live_server

ERRORS = {"400", "401", "403", "404", "413", "415", "429", "503"}
MAX_EXAMPLES = 60  # per operation and generation mode
STATUSES: Counter[str] = Counter()
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def _document(env: dict[str, str]) -> dict[str, Any]:
    with TestClient(create_app(parse_settings(env)), base_url="http://127.0.0.1") as client:
        res = client.get("/schema/openapi.json")
        assert res.status_code == 200
        return res.json()  # type: ignore[no-any-return]


def test_document_declares_envelope_streams_and_text() -> None:
    doc = _document({})
    paths = doc["paths"]
    envelope = {"$ref": "#/components/schemas/ErrorResponse"}
    chat = paths["/v1/chat/completions"]["post"]
    assert set(chat["responses"]) >= ERRORS
    for status in ERRORS:
        assert chat["responses"][status]["content"]["application/json"]["schema"] == envelope
    assert doc["components"]["schemas"]["ErrorBody"]["required"] == ["message", "type", "param", "code"]
    for route in ("/v1/chat/completions", "/v1/completions"):
        assert set(paths[route]["post"]["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    # msgspec's own schema: the bounds it enforces, zero included (Litestar's generator drops those).
    temperature = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["temperature"]
    assert temperature["anyOf"][0] == {"type": "number", "minimum": 0.0, "maximum": 2.0}
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "429" in chat["responses"] and "Retry-After" in chat["responses"]["429"]["headers"]
    assert {"/v1/models/{model_id}/load", "/v1/models/{model_id}/unload"} <= set(paths)
    assert "requestBody" not in paths["/v1/models/{model_id}/unload"]["post"]
    # Litestar's own 400 body appears nowhere.
    assert "status_code" not in str(doc["paths"])
    assert "security" not in chat  # no keys configured: none asked for


def test_document_asks_for_keys_when_they_are_on() -> None:
    doc = _document({"API_KEYS": "k1", "ADMIN_API_KEYS": "a1"})
    assert doc["paths"]["/v1/chat/completions"]["post"]["security"] == [{"bearer": []}]
    assert doc["paths"]["/v1/cache/clear"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/health"]["get"]
    with TestClient(create_app(parse_settings({"API_KEYS": "k1"})), base_url="http://127.0.0.1") as client:
        assert client.get("/schema").status_code == 200  # the documents need no key
        assert client.get("/schema/openapi.json").status_code == 200
        assert client.get("/v1/models").status_code == 401


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {
        "COLLECTIONS_DIR": str(tmp_path_factory.mktemp("collections")),  # fuzzed names must stay in here
        "LIGHT_MODEL_PATH": "fake/gemma-3-270m",
        "LIGHT_N_CTX": "256",
        "MAX_TOKENS_LIMIT": "4",
    }
    with live_server(env, wait_for=("light",), engines=fake_engines()) as live:
        yield live


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_fuzz_against_document(fuzzed_server: LiveServer, mode: GenerationMode) -> None:
    # schemathesis.pytest.from_fixture reads a pytest internal that pytest 9.2 removed (`_nodeid`),
    # so each operation runs as a plain Hypothesis test over schemathesis's strategy.
    api = schemathesis.openapi.from_url(f"{fuzzed_server.url}/schema/openapi.json")
    failures: list[str] = []
    for result in api.get_all_operations():
        _fuzz(result.ok(), mode, failures)
    print("\n".join(f"{k}: {v}" for k, v in sorted(STATUSES.items())))
    assert not failures, "\n\n".join(failures)


def _fuzz(operation: Any, mode: GenerationMode, failures: list[str]) -> None:
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # the same requests every run
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), served=st.booleans())
    def run(case: Any, served: bool) -> None:
        # Half the requests reach the model (random names only get 404s); a negative case keeps its
        # body as generated: overwriting its broken `model` could make it valid.
        if served and mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "light"
        try:
            response = case.call_and_validate(timeout=60, checks=CHECKS)
            STATUSES[f"{mode.value} {operation.label} {response.status_code}"] += 1
        except AssertionError as exc:
            failures.append(f"{mode.value} {operation.label}: {exc}\n{case.as_curl_command()}")
            raise

    try:
        run()
    except AssertionError:
        pass  # recorded: go on with the next operation
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE  # nothing to break in a GET without parameters
