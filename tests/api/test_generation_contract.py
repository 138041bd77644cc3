"""The generation contract: one suite, run against both engines through HTTP and the openai SDK.

llama.cpp runs the real Gemma 3 270M GGUF; MLX runs a tiny random model built by the tests. Both
are base/random models, so the tests check structure and behaviour, never the meaning of text.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.live import LiveServer

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "enum": [1, 2, 3]}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
HISTORY = [
    {"role": "system", "content": "You are a careful assistant who answers briefly."},
    {"role": "user", "content": "Tell me about the history of the bicycle in a few sentences. " * 4},
    {"role": "assistant", "content": "The bicycle was invented in the nineteenth century."},
]


@pytest.fixture(scope="module")
def server(engine_server: LiveServer) -> LiveServer:
    return engine_server


@pytest.fixture(scope="module")
def client(engine_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{engine_server.url}/v1", api_key="not-needed", max_retries=0)


def chat(client: openai.OpenAI, **kwargs: object) -> openai.types.chat.ChatCompletion:
    kwargs.setdefault("messages", [{"role": "user", "content": "Hello there"}])
    return client.chat.completions.create(model="light", **kwargs)  # type: ignore[call-overload, no-any-return]


def test_models_list_names_tier_engine_and_device(client: openai.OpenAI, server: LiveServer) -> None:
    models = client.models.list().data
    assert [m.owned_by for m in models] == ["llmservice-light"]
    card = models[0].model_dump()
    assert card["id"].startswith("light/")
    assert card["engine"] == server.app.state.registry.slots["light"].engine_name
    assert card["device"] == "cpu" and card["status"] == "loaded" and card["context_length"] == 1024


def test_health_says_how_much_kv_the_tier_holds(server: LiveServer) -> None:
    with server.client() as http:
        light = http.get("/health").json()["tiers"]["light"]
    engine = server.app.state.registry.slots["light"].engine
    if light["engine"] == "llamacpp":  # what llama.cpp allocated for the tier's KV streams
        assert light["kv_bytes"] == engine.kv_bytes and light["kv_bytes"] > 0
    else:
        assert light["kv_bytes"] is None


def test_chat_completion_shape_and_usage(client: openai.OpenAI) -> None:
    res = chat(client, max_tokens=6)
    assert res.object == "chat.completion" and res.id.startswith("chatcmpl-")
    choice = res.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert res.usage is not None
    assert res.usage.prompt_tokens > 3
    assert 1 <= res.usage.completion_tokens <= 6 or choice.finish_reason == "stop"
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
    if choice.finish_reason == "length":
        assert res.usage.completion_tokens == 6


def test_tier_defaults_apply_when_request_omits_them(client: openai.OpenAI) -> None:
    chat(client)  # warm the cache
    res = chat(client)  # LIGHT_MAX_TOKENS=12, LIGHT_TEMPERATURE=0
    assert res.usage is not None and res.usage.completion_tokens <= 12
    again = chat(client)
    assert again.choices[0].message.content == res.choices[0].message.content  # greedy


def test_longer_prompt_counts_more_tokens(client: openai.OpenAI) -> None:
    short = chat(client, max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    long = chat(client, max_tokens=1, messages=[{"role": "user", "content": "Hi " * 40}])
    assert short.usage is not None and long.usage is not None
    assert long.usage.prompt_tokens > short.usage.prompt_tokens + 20


def test_streaming_chat_matches_non_streaming(client: openai.OpenAI) -> None:
    chat(client, max_tokens=10)  # warm the prefix cache, as in test_completions_plain_and_stream
    whole = chat(client, max_tokens=10)
    events = list(
        client.chat.completions.create(
            model="light",
            messages=[{"role": "user", "content": "Hello there"}],
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert events[0].choices[0].delta.role == "assistant"
    assert events[-1].choices == [] and events[-1].usage is not None
    finishing = [e for e in events if e.choices and e.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == whole.choices[0].finish_reason
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == whole.choices[0].message.content
    assert events[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert len({e.id for e in events}) == 1


def test_raw_sse_framing(server: LiveServer) -> None:
    body = {"model": "light", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    with server.client() as http, http.stream("POST", "/v1/chat/completions", json=body) as res:
        assert res.status_code == 200
        assert res.headers["content-type"].startswith("text/event-stream")
        raw = res.read().decode()
    frames = [f for f in raw.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"
    for frame in frames[:-1]:
        assert json.loads(frame.removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_completions_plain_and_stream(client: openai.OpenAI) -> None:
    # Warm the prefix cache first: llama.cpp's greedy pick can differ between a cold prompt and a
    # cached one (different batch shapes, different float rounding), so compare like with like.
    client.completions.create(model="light", prompt="Once upon a time", max_tokens=8)
    res = client.completions.create(model="light", prompt="Once upon a time", max_tokens=8)
    assert res.object == "text_completion" and isinstance(res.choices[0].text, str)
    assert res.usage is not None and res.usage.completion_tokens <= 8
    stream = client.completions.create(
        model="light", prompt="Once upon a time", max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    events = list(stream)
    text = "".join(e.choices[0].text for e in events if e.choices)
    assert text == res.choices[0].text
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == res.usage.completion_tokens


def test_completions_accept_token_ids(client: openai.OpenAI) -> None:
    text = client.completions.create(model="light", prompt="Once upon a time", max_tokens=1)
    assert text.usage is not None
    ids = client.completions.create(model="light", prompt=[2, 100, 200, 300], max_tokens=1)
    assert ids.usage is not None and ids.usage.prompt_tokens == 4
    with pytest.raises(openai.BadRequestError, match="outside this model's vocabulary"):
        client.completions.create(model="light", prompt=[2, 10_000_000], max_tokens=1)


def test_stop_string_is_never_streamed(client: openai.OpenAI) -> None:
    client.completions.create(model="light", prompt="The list:", max_tokens=24)  # warm the cache
    full = client.completions.create(model="light", prompt="The list:", max_tokens=24).choices[0].text
    if len(full) < 8:
        pytest.skip(f"the model stopped too early to pick a stop string: {full!r}")
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    pieces = [
        e.choices[0].text
        for e in client.completions.create(model="light", prompt="The list:", max_tokens=24, stop=[stop], stream=True)
    ]
    assert "".join(pieces) == expected
    assert all(stop not in p for p in pieces)
    plain = client.completions.create(model="light", prompt="The list:", max_tokens=24, stop=stop)
    assert plain.choices[0].text == expected and plain.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    chat(client, temperature=1.0, seed=1234, max_tokens=8)  # warm the cache
    a = chat(client, temperature=1.0, seed=1234, max_tokens=8).choices[0].message.content
    b = chat(client, temperature=1.0, seed=1234, max_tokens=8).choices[0].message.content
    assert a == b


def test_json_schema_output_is_enforced(client: openai.OpenAI) -> None:
    res = chat(
        client,
        max_tokens=60,
        messages=[{"role": "user", "content": "Give me a JSON answer."}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
    )
    assert res.choices[0].finish_reason == "stop"
    value = json.loads(res.choices[0].message.content or "")
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)


def test_json_object_output_is_an_object(client: openai.OpenAI) -> None:
    res = chat(client, max_tokens=40, response_format={"type": "json_object"})
    text = (res.choices[0].message.content or "").strip()
    assert text.startswith("{")
    if res.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_follow_up_turn_reuses_cached_prefix(client: openai.OpenAI) -> None:
    first = chat(client, max_tokens=2, messages=[*HISTORY, {"role": "user", "content": "Why?"}])
    second = chat(client, max_tokens=2, messages=[*HISTORY, {"role": "user", "content": "And then what?"}])
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens >= 40
    assert details.cached_tokens < second.usage.prompt_tokens


def test_prompt_longer_than_context_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, messages=[{"role": "user", "content": "word " * 1500}])
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "context_length_exceeded"
    assert "1024" in body["message"] and str(err.value.body["message"]).count("tokens") >= 2


def test_stream_errors_before_start_are_plain_http_errors(server: LiveServer) -> None:
    body = {"model": "light", "messages": [{"role": "user", "content": "word " * 1500}], "stream": True}
    with server.client() as http:
        res = http.post("/v1/chat/completions", json=body)
    assert res.status_code == 400 and res.json()["error"]["code"] == "context_length_exceeded"


def test_client_disconnect_stops_generation(server: LiveServer) -> None:
    worker = server.app.state.registry.slots["light"].worker
    body = {"model": "light", "prompt": "Count:", "max_tokens": 900, "stream": True}
    with server.client() as http, http.stream("POST", "/v1/completions", json=body) as res:
        lines = res.iter_lines()
        for _ in range(3):
            next(lines)
        assert worker.busy
    deadline = time.monotonic() + 10
    while worker.busy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not worker.busy, "generation kept running after the client left"
    # The worker is free for the next request.
    with server.client() as http:
        assert http.post("/v1/completions", json={"model": "light", "prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_health_answers_while_generating(server: LiveServer, tmp_path: Path) -> None:
    body = {"model": "light", "prompt": "Count:", "max_tokens": 300, "stream": True}
    with server.client() as http, http.stream("POST", "/v1/completions", json=body) as res:
        lines = res.iter_lines()
        next(lines)
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 200 and health.json()["tiers"]["light"]["busy"] is True


def test_tokenize_counts_what_chat_sees(server: LiveServer, client: openai.OpenAI) -> None:
    res = chat(client, max_tokens=1)  # the default messages
    with server.client() as http:
        body = {"model": "light", "messages": [{"role": "user", "content": "Hello there"}]}
        tokenized = http.post("/tokenize", json=body).json()
        assert res.usage is not None and tokenized["count"] == len(tokenized["tokens"]) == res.usage.prompt_tokens
        assert tokenized["max_model_len"] == 1024
        text = http.post("/detokenize", json={"model": "light", "tokens": tokenized["tokens"]}).json()["prompt"]
        assert "Hello there" in text
        plain = http.post("/v1/tokenize", json={"model": "light", "prompt": "Hello there"}).json()
        assert 0 < plain["count"] < tokenized["count"]  # no chat template around it
        assert http.post("/detokenize", json={"model": "light", "tokens": [10**9]}).status_code == 400
        assert http.post("/tokenize", json={"model": "light"}).status_code == 400


def test_chat_logprobs_plain_and_streamed(client: openai.OpenAI) -> None:
    # Scores are the model's own distribution: without a repeat penalty greedy takes the best one.
    res = chat(client, max_tokens=5, logprobs=True, top_logprobs=2, extra_body={"repeat_penalty": 1.0})
    content = res.choices[0].logprobs.content if res.choices[0].logprobs else None
    assert res.usage is not None and content is not None and len(content) == res.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-3)
    assert "".join(e.token for e in content) == res.choices[0].message.content
    streamed = []
    for chunk in chat(client, max_tokens=5, logprobs=True, stream=True, extra_body={"repeat_penalty": 1.0}):  # type: ignore[attr-defined]
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed += chunk.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in content]
    assert chat(client, max_tokens=2).choices[0].logprobs is None  # only when asked


def test_logprob_bytes_are_the_tokens_own(server: LiveServer, client: openai.OpenAI) -> None:
    """A token holding part of a UTF-8 character reports its own bytes (its `token` shows U+FFFD):
    the bytes of every token, joined, decode to the answer."""
    ask = [{"role": "user", "content": "Repeat exactly: \U00013000\U00013001\U00013002"}]
    res = chat(client, messages=ask, max_tokens=16, logprobs=True, top_logprobs=1, extra_body={"repeat_penalty": 1.0})
    content = res.choices[0].logprobs.content if res.choices[0].logprobs else None
    assert content is not None
    joined = b"".join(bytes(e.bytes or []) for e in content)
    assert joined.decode("utf-8", errors="replace") == res.choices[0].message.content
    assert all(e.top_logprobs[0].bytes == e.bytes for e in content)  # greedy: the best is the one chosen
    with server.client() as http:  # U+13000 is F0 93 80 80: one byte token each in both vocabularies
        lead = http.post("/tokenize", json={"model": "light", "prompt": "\U00013000"}).json()["tokens"][-4]
    forced = chat(client, messages=ask, max_tokens=1, logprobs=True, logit_bias={str(lead): 100})
    entry = (
        forced.choices[0].logprobs.content[0]
        if forced.choices[0].logprobs and forced.choices[0].logprobs.content
        else None
    )
    assert entry is not None and entry.bytes == [0xF0] and entry.token == "\ufffd"


def test_completions_logprobs_legacy_shape(client: openai.OpenAI) -> None:
    res = client.completions.create(model="light", prompt="Hello there", max_tokens=4, logprobs=2)
    lp = res.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(alternatives) == 2 for alternatives in lp.top_logprobs)
    assert "".join(lp.tokens) == res.choices[0].text


def test_echo_scores_the_prompt(server: LiveServer, client: openai.OpenAI) -> None:
    flat = {"repeat_penalty": 1.0}  # generated tokens' scores are then the raw distribution, as the prompt's
    first = client.completions.create(
        model="light", prompt="The cat sat on the", max_tokens=1, logprobs=1, extra_body=flat
    )
    res = client.completions.create(
        model="light", prompt="The cat sat on the", max_tokens=2, logprobs=2, echo=True, extra_body=flat
    )
    lp, usage = res.choices[0].logprobs, res.usage
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None and usage is not None
    assert len(lp.tokens or []) == usage.prompt_tokens + usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(t or {}) == 2 for t in lp.top_logprobs[1:])
    prompt_text = "".join((lp.tokens or [])[: usage.prompt_tokens])
    assert prompt_text.endswith("The cat sat on the") and res.choices[0].text.startswith("The cat sat on the")
    assert lp.text_offset == sorted(lp.text_offset or [])
    # Scored as a prompt, the generated token keeps the score it had when generated.
    assert first.choices[0].logprobs is not None and first.choices[0].logprobs.token_logprobs is not None
    generated = first.choices[0].logprobs.token_logprobs[0]
    with server.client() as http:
        tokens = http.post("/tokenize", json={"model": "light", "prompt": "The cat sat on the"}).json()["tokens"]
    longer = client.completions.create(
        model="light",
        prompt="The cat sat on the" + first.choices[0].text,
        max_tokens=1,
        logprobs=1,
        echo=True,
        extra_body=flat,
    )
    assert longer.choices[0].logprobs is not None and longer.usage is not None
    if longer.usage.prompt_tokens == len(tokens) + 1:  # the text tokenises back into the same tokens
        scored = longer.choices[0].logprobs.token_logprobs[len(tokens)]  # type: ignore[index]
        # llama.cpp's CPU kernels differ with batch shape (a whole prompt vs one token): close, not equal;
        # a score read off the wrong position would be nats away.
        assert scored == pytest.approx(generated, abs=0.3)


def test_logit_bias_and_penalties_are_honoured(server: LiveServer, client: openai.OpenAI) -> None:
    with server.client() as http:
        token = http.post("/tokenize", json={"model": "light", "prompt": "zebra"}).json()["tokens"][-1]
        text = http.post("/detokenize", json={"model": "light", "tokens": [token]}).json()["prompt"]
    forced = client.completions.create(model="light", prompt="Hello", max_tokens=3, logit_bias={str(token): 100})
    assert forced.choices[0].text == text * 3
    plain = client.completions.create(model="light", prompt="Hello", max_tokens=3)
    penalised = client.completions.create(
        model="light", prompt="Hello", max_tokens=3, logit_bias={str(token): 100}, frequency_penalty=2.0
    )
    assert plain.choices[0].text != forced.choices[0].text and penalised.choices[0].text
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="light", prompt="Hello", max_tokens=1, logit_bias={"999999999": 1})
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="light", prompt="Hello", max_tokens=1, suffix="end")
