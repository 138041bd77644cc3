"""Remote tiers (`{TIER}_BACKEND=remote`, issue 28) against real upstream processes: llmservice on
the fake engines, each in its own process so a test can kill it, plus a hanging socket and a
server answering 500 or garbage. One pool in front per scenario, its servers shared by the module."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from websockets.sync.client import connect

from tests.live import LiveServer, error_of, live_server
from tests.upstreams import Upstream, bad_server, upstreams

ROOT = Path(__file__).resolve().parents[2]
LIGHT = ("light",)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def remote_env(*urls: str, **extra: str) -> dict[str, str]:
    return {"LIGHT_BACKEND": "remote", "LIGHT_REMOTE_URLS": ",".join(urls), **extra}


def front_for(*urls: str, **extra: str) -> contextlib.AbstractContextManager[LiveServer]:
    """Our server with a remote light tier over `urls`, once the tier has loaded (asked each upstream)."""
    return live_server(remote_env(*urls, **extra), wait_for=LIGHT)


@pytest.fixture(scope="module")
def pool() -> Iterator[tuple[LiveServer, list[Upstream]]]:
    """Two fast echo upstreams behind remote light, embedding and reranker tiers."""
    with upstreams((0.0, "echo"), (0.0, "echo")) as ups:
        urls = ",".join(u.url for u in ups)
        env = remote_env(*(u.url for u in ups))
        for tier in ("EMBEDDING", "RERANKER"):
            env |= {f"{tier}_BACKEND": "remote", f"{tier}_REMOTE_URLS": urls, f"{tier}_REMOTE_MODEL": tier.lower()}
        with live_server(env, wait_for=("light", "embedding", "reranker")) as front:
            yield front, ups


def _counts(front: LiveServer) -> list[int]:
    card = httpx.get(f"{front.url}/v1/models").json()["data"][0]
    return [u["requests"] for u in card["upstreams"]]


def _chat(text: str, **extra: object) -> dict[str, object]:
    return {"model": "light", "messages": [{"role": "user", "content": text}], **extra}


def test_balancing_and_affinity(pool: tuple[LiveServer, list[Upstream]]) -> None:
    front, _ = pool
    with front.client() as http:
        before = _counts(front)
        for i in range(12):  # different conversations spread over both upstreams
            res = http.post("/v1/chat/completions", json=_chat(f"conversation {i}"))
            assert res.json()["choices"][0]["message"]["content"] == f"conversation {i}"
        spread = [b - a for a, b in zip(before, _counts(front), strict=True)]
        assert all(n > 0 for n in spread) and sum(spread) == 12
        before = _counts(front)
        for i in range(4):  # one conversation, growing: its first turn decides, always the same upstream
            messages = [{"role": "user", "content": "same"}, *[{"role": "assistant", "content": "x"}] * i]
            assert http.post("/v1/chat/completions", json={"model": "light", "messages": messages}).status_code == 200
        assert sorted(b - a for a, b in zip(before, _counts(front), strict=True)) == [0, 4]
        for key, extra in (("prompt_cache_key", {}), ("user", {}), ("metadata", {"max_tokens": 8})):
            before = _counts(front)  # the client's key wins over the conversation: other texts, one upstream
            for i in range(4):
                value: object = {"user_id": "u-7"} if key == "metadata" else "session-7"
                path = "/v1/messages" if key == "metadata" else "/v1/chat/completions"
                assert http.post(path, json=_chat(f"topic {i}", **{key: value}, **extra)).status_code == 200
            assert sorted(b - a for a, b in zip(before, _counts(front), strict=True)) == [0, 4], key
    health = httpx.get(f"{front.url}/health").json()["tiers"]["light"]
    assert [u["state"] for u in health["upstreams"]] == ["healthy", "healthy"]
    metrics = httpx.get(f"{front.url}/metrics").text
    assert 'llmservice_upstream_healthy{tier="light",url="' in metrics


def test_openai_sdk_streams_with_usage(pool: tuple[LiveServer, list[Upstream]]) -> None:
    front, _ = pool
    client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="none")
    chunks = list(
        client.chat.completions.create(
            model="light",
            messages=[{"role": "user", "content": "streamed through"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed through"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == len("streamed through") and usage.prompt_tokens > 0


def test_responses_and_messages_over_a_chat_upstream(pool: tuple[LiveServer, list[Upstream]]) -> None:
    front, _ = pool
    with front.client() as http:
        res = http.post("/v1/responses", json={"model": "light", "input": "via responses"})
        assert res.status_code == 200, res.text
        assert res.json()["output"][-1]["content"][0]["text"] == "via responses"
        res = http.post(
            "/v1/messages",
            json={"model": "light", "max_tokens": 50, "messages": [{"role": "user", "content": "via messages"}]},
        )
        assert res.status_code == 200, res.text
        assert res.json()["content"][0]["text"] == "via messages"


def test_tool_calls_pass_through() -> None:
    """The upstream parses its model's call into `tool_calls` deltas; they reach our client as calls."""
    with upstreams((0.0, "tool")) as ups, front_for(ups[0].url) as front, front.client() as http:
        res = http.post("/v1/chat/completions", json=_chat("weather?", tools=TOOLS))
        assert res.status_code == 200, res.text
        choice = res.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        call = choice["message"]["tool_calls"][0]["function"]
        assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}


def test_response_cache_and_keys_over_a_remote_tier(pool: tuple[LiveServer, list[Upstream]]) -> None:
    _, ups = pool
    env = remote_env(ups[0].url, ENABLE_CACHE="true", API_KEYS="k1", RATE_LIMIT_PER_MINUTE="3")
    with live_server(env, wait_for=LIGHT) as front, front.client(headers={"Authorization": "Bearer k1"}) as http:
        assert error_of(httpx.post(f"{front.url}/v1/chat/completions", json=_chat("x")), 401)
        chat = _chat("cached", temperature=0)
        first, second = (http.post("/v1/chat/completions", json=chat) for _ in range(2))
        assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
        assert second.json()["choices"][0]["message"]["content"] == "cached"
        assert http.post("/v1/chat/completions", json=chat).status_code == 200  # the third of 3 a minute
        assert error_of(http.post("/v1/chat/completions", json=chat), 429)


def test_batch_jobs_spread_over_the_pool(pool: tuple[LiveServer, list[Upstream]]) -> None:
    front, _ = pool
    lines = "".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": _chat(f"line {i}")})
        + "\n"
        for i in range(16)  # lines go by their conversation's hash: 16 all on one of two upstreams is 2**-15
    )
    with front.client() as http:
        before = _counts(front)
        file = http.post("/v1/files", files={"file": ("b.jsonl", lines)}, data={"purpose": "batch"}).json()
        batch = http.post(
            "/v1/batches",
            json={"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        ).json()
        deadline = time.monotonic() + 30
        while (state := http.get(f"/v1/batches/{batch['id']}").json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert state["request_counts"]["completed"] == 16, state
        out = http.get(f"/v1/files/{state['output_file_id']}/content").text.splitlines()
        answers = {json.loads(line)["custom_id"]: json.loads(line)["response"]["body"] for line in out}
        assert answers["r3"]["choices"][0]["message"]["content"] == "line 3"
        assert all(b > a for a, b in zip(before, _counts(front), strict=True))


def _stream(url: str, text: str, started: threading.Semaphore | None = None) -> tuple[bool, list[str]]:
    """(whether any content arrived, the SSE data payloads); `started` is released at the first event."""
    events: list[str] = []
    body = _chat(text, stream=True, max_tokens=400)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as res:
        if res.status_code != 200:
            res.read()
            return False, [res.text]
        for line in res.iter_lines():
            if line.startswith("data: "):
                if started is not None and not events:
                    started.release()
                events.append(line[6:])
    content = any("content" in e and '"content":""' not in e for e in events[:-1])
    return content, events


def test_upstream_killed_mid_load() -> None:
    """Streams that had no byte yet go to the other upstream; ones cut after end with an error, then [DONE]."""
    with upstreams((0.02, "echo"), (0.02, "echo")) as ups, front_for(*(u.url for u in ups)) as front:
        # ~40 one-character tokens at 20 ms per token per sequence (the fake decodes its batch in turn): ~2 s
        long_text = " ".join(f"w{i}" for i in range(12))
        with concurrent.futures.ThreadPoolExecutor(16) as workers:
            started = threading.Semaphore(0)
            first = [workers.submit(_stream, front.url, f"{long_text} {i}", started) for i in range(8)]
            for _ in first:  # every first stream has its first byte (a loaded machine may take seconds)
                assert started.acquire(timeout=30)
            ups[0].kill()  # the pool learns it from the next request sent there, which goes elsewhere
            later = [workers.submit(_stream, front.url, f"after {i}") for i in range(8)]
            results = [f.result() for f in first + later]
    for content, events in results:
        assert events[-1] == "[DONE]"
        errors = [e for e in events if e.startswith('{"error"')]
        assert content, f"a request failed before its first byte: {events[:3]}"
        if errors:  # cut after its first byte: one error event, then [DONE]
            assert len(errors) == 1 and events[-2] == errors[0]
    assert any(any(e.startswith('{"error"') for e in events) for _, events in results[:8])
    assert all(not any(e.startswith('{"error"') for e in events) for _, events in results[8:])


def test_hanging_upstream_is_ejected_within_its_timeout(pool: tuple[LiveServer, list[Upstream]]) -> None:
    _, ups = pool
    with bad_server("hang") as hang:
        env = remote_env(hang, ups[0].url, LIGHT_REMOTE_TIMEOUT="1", LIGHT_REMOTE_COOLDOWN="60")
        with live_server(env, wait_for=LIGHT) as front, front.client() as http:
            started = time.monotonic()
            for i in range(6):
                res = http.post("/v1/chat/completions", json=_chat(f"q{i}"))
                assert res.status_code == 200 and res.json()["choices"][0]["message"]["content"] == f"q{i}", res.text
            assert time.monotonic() - started < 1 + 5  # at most one request waited out the timeout
            states = {u["url"]: u["state"] for u in http.get("/health").json()["tiers"]["light"]["upstreams"]}
            assert states == {hang: "ejected", ups[0].url: "healthy"}


@pytest.mark.parametrize("kind", ["500", "garbage"])
def test_failing_upstream(pool: tuple[LiveServer, list[Upstream]], kind: str) -> None:
    """Retried on a healthy upstream (never a 500 to the client); alone, it gives a 502 or 503."""
    _, ups = pool
    with bad_server(kind) as bad:
        with front_for(bad, ups[0].url) as front, front.client() as http:
            for i in range(6):
                res = http.post("/v1/chat/completions", json=_chat(f"q{i}"))
                assert res.status_code == 200 and res.json()["choices"][0]["message"]["content"] == f"q{i}", res.text
            view = {u["url"]: u for u in http.get("/v1/models").json()["data"][0]["upstreams"]}
            assert view[bad]["errors"] >= 1
        with front_for(bad, LIGHT_REMOTE_COOLDOWN="60") as front, front.client() as http:
            statuses = {http.post("/v1/chat/completions", json=_chat("q")).status_code for _ in range(4)}
            assert statuses <= {502, 503}


def test_stop_sequence_and_thinking_budget_reach_across() -> None:
    """The stop string a vLLM-style upstream names becomes Messages' `stop_sequence`; a thinking
    budget goes to the upstream as llama-server's `thinking_budget_tokens`, with the template's switch."""
    with bad_server("vllm") as vllm, front_for(vllm) as front, front.client() as http:
        body = {
            "model": "light",
            "max_tokens": 4000,
            "stop_sequences": ["END", "STOP"],
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "messages": [{"role": "user", "content": "think, then stop"}],
        }
        res = http.post("/v1/messages", json=body)
        assert res.status_code == 200, res.text
        answer = res.json()
        assert (answer["stop_reason"], answer["stop_sequence"]) == ("stop_sequence", "STOP")
        sent = json.loads(answer["content"][-1]["text"])  # what the upstream was asked
        assert sent["thinking_budget_tokens"] == 2048
        assert sent["chat_template_kwargs"]["enable_thinking"] is True
        with http.stream("POST", "/v1/messages", json={**body, "stream": True}) as streamed:
            deltas = [json.loads(line[6:]) for line in streamed.iter_lines() if '"message_delta"' in line]
        assert [(d["delta"]["stop_reason"], d["delta"]["stop_sequence"]) for d in deltas] == [("stop_sequence", "STOP")]


@contextlib.contextmanager
def counting_proxy(port: int) -> Iterator[tuple[str, list[int]]]:
    """A TCP relay to 127.0.0.1:`port`: its base URL, and how many connections it accepted."""
    accepted = [0]
    listener = socket.create_server(("127.0.0.1", 0))

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            accepted[0] += 1
            upstream = socket.create_connection(("127.0.0.1", port))
            for ends in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=ends, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1", accepted
    finally:
        listener.close()


def test_requests_reuse_the_upstream_connection(pool: tuple[LiveServer, list[Upstream]]) -> None:
    """A finished stream hands its connection back to the pool: no new TCP connection (and its
    round trip before the first byte) per request."""
    _, ups = pool
    with counting_proxy(ups[0].port) as (url, accepted), front_for(url) as front, front.client() as http:
        for stream in (False, True) * 3:
            res = http.post("/v1/chat/completions", json=_chat("again", stream=stream))
            assert res.status_code == 200, res.text
        # the start-up listing's own client, then one kept alive and the spare connected beside it
        assert accepted[0] <= 3


def test_client_disconnect_closes_the_upstream_request() -> None:
    with upstreams((0.05, "echo")) as ups, front_for(ups[0].url) as front:
        body = _chat(" ".join(f"w{i}" for i in range(100)), stream=True, max_tokens=400)  # ~20 s of tokens
        with httpx.stream("POST", f"{front.url}/v1/chat/completions", json=body, timeout=30) as res:
            lines = res.iter_lines()  # kept: a dropped line iterator closes the response
            while '"content":"w' not in next(lines):
                pass
            assert httpx.get(f"{ups[0].url}/models").json()["data"][0]["in_flight"] == 1
        deadline = time.monotonic() + 5
        while httpx.get(f"{ups[0].url}/models").json()["data"][0]["in_flight"]:
            assert time.monotonic() < deadline, "the upstream still generates for a client that left"
            time.sleep(0.05)
        assert httpx.get(f"{front.url}/v1/models").json()["data"][0]["upstreams"][0]["in_flight"] == 0


def test_tokenize_and_count_tokens_ask_the_upstream(pool: tuple[LiveServer, list[Upstream]]) -> None:
    front, ups = pool
    body = {"model": "light", "messages": [{"role": "user", "content": "count me"}]}
    direct = httpx.post(f"{ups[0].url}/tokenize", json=body).json()
    pooled = httpx.post(f"{front.url}/v1/tokenize", json=body).json()
    assert pooled["tokens"] == direct["tokens"] and pooled["count"] == len(direct["tokens"])
    text = httpx.post(f"{front.url}/v1/detokenize", json={"model": "light", "tokens": direct["tokens"]}).json()
    assert "count me" in text["prompt"]
    counted = httpx.post(f"{front.url}/v1/messages/count_tokens", json=body).json()
    assert counted["input_tokens"] == len(direct["tokens"])


def test_embeddings_and_rerank_over_remote_tiers(pool: tuple[LiveServer, list[Upstream]]) -> None:
    front, ups = pool
    asked = {"model": "embedding", "input": ["alpha", "beta gamma"]}
    direct = httpx.post(f"{ups[0].url}/embeddings", json=asked).json()
    pooled = httpx.post(f"{front.url}/v1/embeddings", json=asked).json()
    assert "data" in pooled, pooled
    for ours, theirs in zip(pooled["data"], direct["data"], strict=True):
        assert ours["embedding"] == pytest.approx(theirs["embedding"])
    assert pooled["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"] > 0
    cut = httpx.post(f"{front.url}/v1/embeddings", json={**asked, "dimensions": 2}).json()["data"][0]["embedding"]
    assert len(cut) == 2 and sum(x * x for x in cut) == pytest.approx(1.0)
    card = next(m for m in httpx.get(f"{front.url}/v1/models").json()["data"] if m["tier"] == "embedding")
    assert card["dimension"] == len(direct["data"][0]["embedding"])  # learnt at load from the upstream
    docs = ["the cat sat", "stock prices fell", "a cat and a dog"]
    ranked = {"model": "reranker", "query": "cat", "documents": docs}
    direct = httpx.post(f"{ups[0].url}/rerank", json=ranked).json()
    pooled = httpx.post(f"{front.url}/v1/rerank", json={**ranked, "top_n": 2}).json()
    expected = [(r["index"], r["relevance_score"]) for r in direct["results"]][:2]
    assert [r["index"] for r in pooled["results"]] == [i for i, _ in expected]
    assert [r["relevance_score"] for r in pooled["results"]] == pytest.approx([score for _, score in expected])
    assert pooled["results"][0]["document"]["text"] == docs[expected[0][0]]


def test_what_needs_a_local_model_is_a_400(pool: tuple[LiveServer, list[Upstream]]) -> None:
    front, _ = pool
    with front.client() as http:
        error = error_of(http.post("/v1/chat/completions", json=_chat("x", adapter="legal")), 404)
        assert "legal" in str(error["message"])
        echo = {"model": "light", "prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 2}
        assert error_of(http.post("/v1/completions", json=echo), 400)["param"] == "echo"
        # The prefix caches are the upstreams' own: clearing ours skips the remote tier.
        assert http.post("/v1/cache/clear", json={"target": "prefix"}).json()["cleared"]["prefix"]["tiers"] == []


def test_websocket_and_rag_over_remote_tiers(pool: tuple[LiveServer, list[Upstream]]) -> None:
    front, _ = pool
    with connect(front.url.replace("http://", "ws://") + "/v1/ws") as ws:
        body = {**_chat("over the socket"), "stream": True}
        ws.send(json.dumps({"type": "chat.completions", "id": "w", "body": body}))
        messages: list[dict[str, Any]] = []
        while not messages or messages[-1]["type"] != "done":
            messages.append(json.loads(ws.recv(timeout=60)))
    text = "".join(c["delta"].get("content") or "" for m in messages[:-1] for c in m["data"]["choices"])
    assert text == "over the socket"

    with front.client() as http:  # a collection embedded upstream, answered by the remote light tier
        assert http.post("/v1/collections", json={"name": "remote-kb"}).status_code == 200
        docs = [{"id": "mascot", "text": "The mascot is a quill."}, {"id": "dough", "text": "Let dough rise."}]
        assert http.post("/v1/collections/remote-kb/documents", json={"documents": docs}).status_code == 200
        ask = {**_chat("What is the mascot?"), "rag": {"top_k": 2}}
        res = http.post("/v1/collections/remote-kb/chat/completions", json=ask)
        assert res.status_code == 200, res.text
        assert res.json()["documents_retrieved"] == 2 and res.json()["choices"][0]["message"]["content"]
