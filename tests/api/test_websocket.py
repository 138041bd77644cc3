"""/v1/ws through a real WebSocket client (`websockets`) against a real server and the real models:
the same answers and errors as HTTP, several requests per connection, cancel, auth and bounds."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.live import LiveServer, error_of, live_server

USER, ADMIN = "sk-ws-user", "sk-ws-admin"
CHAT = {"model": "light", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}
PROMPT = {"model": "light", "prompt": "The capital of France is", "max_tokens": 6}


def ws_url(server: LiveServer) -> str:
    return server.url.replace("http://", "ws://") + "/v1/ws"


def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    ws.send(json.dumps(message))


def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=120))  # type: ignore[no-any-return]


def until_done(ws: ClientConnection, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Every message of the requests `ids`, by id, up to and including each one's `done`."""
    got: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    open_ids = set(ids)
    while open_ids:
        message = recv(ws)
        assert message.get("id") in got, message
        got[message["id"]].append(message)
        if message["type"] == "done":
            open_ids.discard(message["id"])
    return got


def streamed_text(messages: list[dict[str, Any]], field: str = "content") -> str:
    assert messages[-1]["type"] == "done" and all(m["type"] == "chunk" for m in messages[:-1]), messages
    choices = [c for m in messages[:-1] for c in m["data"]["choices"]]
    return "".join((c["delta"].get(field) or "") if "delta" in c else c["text"] for c in choices)


# -- both engines: the same answers as HTTP, concurrency and cancel ---------------------------------


def test_answers_match_http(engine_server: LiveServer) -> None:
    with engine_server.client() as http:
        chat = http.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"]
        completion = http.post("/v1/completions", json=PROMPT).json()
    with connect(ws_url(engine_server)) as ws:
        send(ws, {"type": "chat.completions", "id": "s", "body": {**CHAT, "stream": True}})
        send(ws, {"type": "completions", "id": "r", "body": PROMPT})
        got = until_done(ws, {"s", "r"})
    assert streamed_text(got["s"]) == chat
    response, done = got["r"]
    assert response["type"] == "response" and response["data"]["object"] == "text_completion"
    assert response["data"]["choices"][0]["text"] == completion["choices"][0]["text"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens depends on prefix reuse
    assert [response["data"]["usage"][k] for k in counts] == [completion["usage"][k] for k in counts]
    assert done == {"type": "done", "id": "r", "cancelled": False}


def test_concurrent_requests_and_an_error_between_them(engine_server: LiveServer) -> None:
    with engine_server.client() as http:
        expected = http.post("/v1/completions", json=PROMPT).json()["choices"][0]["text"]
        http_error = error_of(http.post("/v1/completions", json={**PROMPT, "temperature": 9}), 400)
    with connect(ws_url(engine_server)) as ws:
        for i in ("a", "b", "c"):
            send(ws, {"type": "completions", "id": i, "body": {**PROMPT, "stream": True}})
        send(ws, {"type": "completions", "id": "bad", "body": {**PROMPT, "temperature": 9}})
        send(ws, {"type": "ping", "data": {"n": 1}})
        got = until_done_with_pong(ws, {"a", "b", "c", "bad"})
    for i in ("a", "b", "c"):
        assert streamed_text(got[i]) == expected
    error, done = got["bad"]
    assert error == {"type": "error", "id": "bad", "status": 400, "error": http_error}
    assert done["type"] == "done"


def until_done_with_pong(ws: ClientConnection, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    got: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    open_ids, pongs = set(ids), 0
    while open_ids or not pongs:
        message = recv(ws)
        if message["type"] == "pong":
            assert message["data"] == {"n": 1}
            pongs += 1
            continue
        got[message["id"]].append(message)
        if message["type"] == "done":
            open_ids.discard(message["id"])
    return got


def test_cancel_stops_generation(engine_server: LiveServer) -> None:
    worker = engine_server.app.state.registry.slots["light"].worker
    long = {**PROMPT, "prompt": "Count slowly: one, two,", "max_tokens": 1000, "stream": True}
    with connect(ws_url(engine_server)) as ws:
        send(ws, {"type": "completions", "id": "long", "body": long})
        first = recv(ws)
        assert first["type"] == "chunk"
        send(ws, {"type": "cancel", "id": "long"})
        chunks = 1
        while (message := recv(ws))["type"] == "chunk":
            chunks += 1
        assert message == {"type": "done", "id": "long", "cancelled": True}
        assert chunks < 200
        deadline = time.monotonic() + 10
        while worker.in_flight:  # the engine let the job go, not just the socket
            assert time.monotonic() < deadline, "generation went on after cancel"
            time.sleep(0.05)
        send(ws, {"type": "cancel", "id": "long"})  # nothing left to cancel: said so
        error = recv(ws)
        assert (error["type"], error["error"]["code"]) == ("error", "request_not_found")
        send(ws, {"type": "completions", "id": "after", "body": PROMPT})  # the connection goes on
        assert [m["type"] for m in until_done(ws, {"after"})["after"]] == ["response", "done"]


def test_closing_the_socket_stops_its_generations(engine_server: LiveServer) -> None:
    worker = engine_server.app.state.registry.slots["light"].worker
    with connect(ws_url(engine_server)) as ws:
        send(ws, {"type": "completions", "id": "x", "body": {**PROMPT, "max_tokens": 1000, "stream": True}})
        assert recv(ws)["type"] == "chunk"
    deadline = time.monotonic() + 10
    while worker.in_flight:
        assert time.monotonic() < deadline, "generation went on after the client left"
        time.sleep(0.05)


# -- auth, limits and hostile messages (llama.cpp Gemma) -------------------------------------------


@pytest.fixture(scope="module")
def keyed(gemma_gguf: str) -> Iterator[LiveServer]:
    env = {"LIGHT_MODEL_PATH": gemma_gguf, "LIGHT_N_CTX": "512", "LIGHT_TEMPERATURE": "0", "LIGHT_N_THREADS": "1",
           "API_KEYS": USER, "ADMIN_API_KEYS": ADMIN, "WS_MAX_REQUESTS": "2", "MAX_BODY_BYTES": "4096"}  # fmt: skip
    with live_server(env, wait_for=("light",)) as live:
        yield live


def keyed_ws(server: LiveServer, **kwargs: Any) -> ClientConnection:
    return connect(ws_url(server), additional_headers={"Authorization": f"Bearer {USER}"}, **kwargs)


def closed_with(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=30)
    return info.value.rcvd.code if info.value.rcvd else None


def test_key_in_the_first_message(keyed: LiveServer) -> None:
    with connect(ws_url(keyed)) as ws:
        send(ws, {"type": "auth", "api_key": USER})
        assert recv(ws) == {"type": "authenticated"}
        send(ws, {"type": "completions", "id": "1", "body": PROMPT})
        assert [m["type"] for m in until_done(ws, {"1"})["1"]] == ["response", "done"]
        send(ws, {"type": "auth", "api_key": ADMIN})  # a key may change; a bad one later still closes
        assert recv(ws) == {"type": "authenticated"}
        send(ws, {"type": "auth", "api_key": "sk-wrong"})
        assert recv(ws)["error"]["code"] == "invalid_api_key"
        assert closed_with(ws) == 4401


@pytest.mark.parametrize(
    ("headers", "first", "code"),
    [
        ({}, {"type": "auth", "api_key": "sk-wrong"}, "invalid_api_key"),
        ({}, {"type": "completions", "id": "1", "body": PROMPT}, "missing_api_key"),
        ({}, {"type": "auth"}, "missing_api_key"),
        ({"Authorization": "Bearer sk-wrong"}, None, "invalid_api_key"),
    ],
)
def test_bad_or_missing_key_closes_with_the_envelope(
    keyed: LiveServer, headers: dict[str, str], first: dict[str, Any] | None, code: str
) -> None:
    with connect(ws_url(keyed), additional_headers=headers) as ws:
        if first is not None:
            send(ws, first)
        error = recv(ws)
        assert error["type"] == "error" and error["status"] == 401 and error["id"] is None
        assert set(error["error"]) >= {"message", "type", "param", "code"} and error["error"]["code"] == code
        assert closed_with(ws) == 4401


def test_pages_from_other_origins_are_refused(keyed: LiveServer) -> None:
    with pytest.raises(InvalidStatus) as info:
        keyed_ws(keyed, origin="http://evil.example").close()
    assert info.value.response.status_code == 403
    with keyed_ws(keyed, origin="http://localhost:5173") as ws:  # CORS_ORIGINS allows local pages
        send(ws, {"type": "ping"})
        assert recv(ws) == {"type": "pong", "data": None}


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (b"{not json", "Malformed JSON"),
        (b"\xff\xfe", "Malformed JSON"),
        (b'{"type": "ping", "data": ' + b"[" * 1900 + b"]" * 1900 + b"}", "nested too deeply"),
        ({"type": "shout", "id": "1"}, "Invalid request"),
        ({"type": "completions", "body": PROMPT}, "needs an id"),
        ({"type": "completions", "id": "1"}, "needs a body"),
        ({"type": "completions", "id": "x" * 200, "body": PROMPT}, "Invalid request"),
        ({"type": "ping", "extra": 1}, "unknown field"),
    ],
)
def test_bad_messages_get_an_error_and_the_connection_goes_on(keyed: LiveServer, message: Any, words: str) -> None:
    with keyed_ws(keyed) as ws:
        ws.send(message if isinstance(message, bytes) else json.dumps(message))
        error = recv(ws)
        assert error["type"] == "error" and error["status"] == 400, error
        assert words in error["error"]["message"]
        send(ws, {"type": "ping", "data": 1})
        assert recv(ws) == {"type": "pong", "data": 1}


def test_request_errors_are_the_http_envelope(keyed: LiveServer) -> None:
    bodies = [{**PROMPT, "model": "nope"}, {**PROMPT, "max_tokens": 0}, {**PROMPT, "suffix": "x"}, {"model": "light"}]
    with keyed.client(headers={"Authorization": f"Bearer {USER}"}) as http, keyed_ws(keyed) as ws:
        for n, body in enumerate(bodies):
            res = http.post("/v1/completions", json=body)
            send(ws, {"type": "completions", "id": str(n), "body": body})
            error, done = until_done(ws, {str(n)})[str(n)]
            assert error == {"type": "error", "id": str(n), "status": res.status_code, "error": res.json()["error"]}
            assert done["type"] == "done"


def test_a_connection_runs_at_most_ws_max_requests(keyed: LiveServer) -> None:
    slow = {**PROMPT, "max_tokens": 40, "stream": True}
    with keyed_ws(keyed) as ws:
        for i in ("1", "2", "3"):
            send(ws, {"type": "completions", "id": i, "body": slow})
        send(ws, {"type": "completions", "id": "1", "body": slow})  # the same id while it runs
        got = until_done(ws, {"1", "2", "3"})
    third = got["3"]
    assert [m["type"] for m in third] == ["error", "done"]
    assert (third[0]["status"], third[0]["error"]["code"]) == (429, "too_many_requests")
    duplicate = [m for m in got["1"] if m["type"] == "error"]
    assert duplicate and "still running" in duplicate[0]["error"]["message"]
    assert got["1"][-1]["type"] == got["2"][-1]["type"] == "done"


def test_a_message_over_max_body_bytes_closes_the_connection(keyed: LiveServer) -> None:
    with keyed_ws(keyed) as ws:
        send(ws, {"type": "ping", "data": "x" * 5000})
        assert closed_with(ws) == 1009
    with keyed_ws(keyed) as ws:  # the server goes on
        send(ws, {"type": "ping"})
        assert recv(ws)["type"] == "pong"


def test_each_request_counts_against_the_rate_limit(keyed: LiveServer) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=keyed.url, headers=admin) as http:
        assert http.patch("/v1/config", json={"server": {"rate_limit_per_minute": 2}}).status_code == 200
        try:
            with keyed_ws(keyed) as ws:
                statuses = []
                for i in ("1", "2", "3"):
                    send(ws, {"type": "completions", "id": i, "body": {**PROMPT, "max_tokens": 1}})
                    first = until_done(ws, {i})[i][0]
                    statuses.append(first.get("status", 200))
            assert statuses == [200, 200, 429]
        finally:
            assert http.patch("/v1/config", json={"server": {"rate_limit_per_minute": 0}}).status_code == 200
