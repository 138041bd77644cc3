"""Batch jobs through the real openai SDK against a real server: real Gemma 270M (llama.cpp), the
tiny MLX model and all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from openai.types import Batch

from tests.live import LiveServer, error_of, live_server

CHAT = "/v1/chat/completions"
FINISHED = ("completed", "failed", "cancelled", "expired")


def _client(live: LiveServer, key: str = "none") -> OpenAI:
    return OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)


def _line(custom_id: str, body: dict[str, Any], url: str = CHAT) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(line) for line in lines).encode() + b"\n"


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "light", "messages": [{"role": "user", "content": text}], "temperature": 0, **extra}


def _submit(client: OpenAI, lines: list[dict[str, Any]], endpoint: str = CHAT) -> Batch:
    upload = client.files.create(file=("requests.jsonl", _jsonl(lines)), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes == len(_jsonl(lines))
    return client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]


def _wait(client: OpenAI, batch_id: str, until: Any = lambda b: b.status in FINISHED, timeout: float = 300) -> Batch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        time.sleep(0.1)
    raise TimeoutError(f"batch {batch_id} did not get there: {batch}")


def _results(client: OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    lines = [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines)  # every request answered once
    return by_id


# -- results match the same requests sent directly ------------------------------------------------


def test_chat_and_completion_batches_answer_like_direct_requests(engine_server: LiveServer) -> None:
    """Without the response cache (llama.cpp's output may shift slightly with prefix reuse), compare
    what does not: the shape and the prompt's tokens, and greedy answers' lengths."""
    client = _client(engine_server)
    prompts = ["Name a colour.", "Count to three.", "Say hello."]
    chat_lines = [_line(f"chat-{i}", _chat(p, max_tokens=6)) for i, p in enumerate(prompts)]
    text_lines = [
        _line(f"text-{i}", {"model": "light", "prompt": p, "max_tokens": 6, "temperature": 0}, "/v1/completions")
        for i, p in enumerate(prompts)
    ]
    chat_batch = _submit(client, chat_lines)
    text_batch = _submit(client, text_lines, "/v1/completions")
    assert chat_batch.status == "validating" and chat_batch.request_counts is not None

    chat_done, text_done = _wait(client, chat_batch.id), _wait(client, text_batch.id)
    for done in (chat_done, text_done):
        assert done.status == "completed", done
        assert done.request_counts is not None and done.request_counts.model_dump() == {
            "total": 3,
            "completed": 3,
            "failed": 0,
        }
        assert done.error_file_id is None and done.errors is None
        assert done.in_progress_at and done.finalizing_at and done.completed_at
        assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
        assert done.usage is not None and done.usage.total_tokens > 0

    chats = _results(client, chat_done.output_file_id)
    assert set(chats) == {"chat-0", "chat-1", "chat-2"}
    for i, prompt in enumerate(prompts):
        line = chats[f"chat-{i}"]
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"].startswith("req_")
        body = openai.types.chat.ChatCompletion.model_validate(line["response"]["body"])
        direct = client.chat.completions.create(**_chat(prompt, max_tokens=6))
        assert body.usage is not None and direct.usage is not None
        assert body.usage.prompt_tokens == direct.usage.prompt_tokens
        assert body.choices[0].message.role == "assistant" and isinstance(body.choices[0].message.content, str)
    texts = _results(client, text_done.output_file_id)
    for i, prompt in enumerate(prompts):
        completion = openai.types.Completion.model_validate(texts[f"text-{i}"]["response"]["body"])
        direct_text = client.completions.create(model="light", prompt=prompt, max_tokens=6, temperature=0)
        assert completion.usage is not None and direct_text.usage is not None
        assert completion.usage.prompt_tokens == direct_text.usage.prompt_tokens
    summed = sum(line["response"]["body"]["usage"]["total_tokens"] for line in chats.values())
    assert chat_done.usage is not None and chat_done.usage.total_tokens == summed


@pytest.fixture(scope="module")
def server(gemma_gguf: str, minilm_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Gemma with the response cache on (identical greedy requests replay, so a batch line's answer
    equals the direct one exactly), MiniLM, and an API key."""
    env = {
        "LIGHT_MODEL_PATH": gemma_gguf,
        "LIGHT_N_CTX": "1024",
        "LIGHT_MAX_TOKENS": "8",
        "LIGHT_N_THREADS": "1",
        "EMBEDDING_MODEL_PATH": minilm_path,
        "ENABLE_CACHE": "true",
        "API_KEYS": "sk-batch",
        "BATCH_DIR": str(tmp_path_factory.mktemp("batches")),
        "BATCH_MAX_FILE_BYTES": "200000",
        "BATCH_MAX_LINES": "50",
        "BATCH_MAX_LINE_BYTES": "20000",
        "BATCH_MAX_FILES": "40",
    }
    with live_server(env, wait_for=("light", "embedding")) as live:
        yield live


def test_batch_answers_equal_direct_answers_through_the_cache(server: LiveServer) -> None:
    client = _client(server, "sk-batch")
    direct = client.chat.completions.create(**_chat("Tell me a fact.", max_tokens=8))
    batch = _wait(client, _submit(client, [_line("fact", _chat("Tell me a fact.", max_tokens=8))]).id)
    body = _results(client, batch.output_file_id)["fact"]["response"]["body"]
    assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
    assert body["usage"]["completion_tokens"] == direct.usage.completion_tokens  # type: ignore[union-attr]


def test_embeddings_batch_matches_direct_embeddings(server: LiveServer) -> None:
    client = _client(server, "sk-batch")
    texts = ["a cat on a mat", "quantum chromodynamics", "the stock market fell"]
    lines = [
        _line(f"e{i}", {"model": "embedding", "input": text, "encoding_format": "float"}, "/v1/embeddings")
        for i, text in enumerate(texts)
    ]
    lines.append(_line("pair", {"model": "embedding", "input": texts[:2]}, "/v1/embeddings"))
    batch = _wait(client, _submit(client, lines, "/v1/embeddings").id)
    assert batch.status == "completed" and batch.request_counts is not None and batch.request_counts.completed == 4
    results = _results(client, batch.output_file_id)
    direct = client.embeddings.create(model="embedding", input=texts, encoding_format="float")
    for i in range(3):
        got = openai.types.CreateEmbeddingResponse.model_validate(results[f"e{i}"]["response"]["body"])
        assert len(got.data[0].embedding) == 384
        np.testing.assert_allclose(got.data[0].embedding, direct.data[i].embedding, atol=1e-5)
    assert len(results["pair"]["response"]["body"]["data"]) == 2
    assert batch.usage is not None and batch.usage.input_tokens > 0 and batch.usage.output_tokens == 0


# -- errors ---------------------------------------------------------------------------------------


def test_bad_lines_go_to_the_error_file_with_the_http_envelope(server: LiveServer) -> None:
    client = _client(server, "sk-batch")
    lines = [
        _line("good", _chat("Hi", max_tokens=3)),
        _line("streamed", _chat("Hi", stream=True)),
        _line("no-model", _chat("Hi") | {"model": "gpt-17"}),
        _line("bad-type", _chat("Hi") | {"temperature": "hot"}),
        _line("too-long", _chat("Hi", max_tokens=10**9)),
        _line("not-chat", {"model": "light", "prompt": "Hi"}),
        _line("embedding-tier", _chat("Hi") | {"model": "embedding"}),
    ]
    batch = _wait(client, _submit(client, lines).id)
    assert batch.status == "completed"
    assert batch.request_counts is not None and (batch.request_counts.completed, batch.request_counts.failed) == (1, 6)
    assert set(_results(client, batch.output_file_id)) == {"good"}
    errors = _results(client, batch.error_file_id)
    assert set(errors) == {"streamed", "no-model", "bad-type", "too-long", "not-chat", "embedding-tier"}
    for line in errors.values():
        assert line["error"] is None
        body = line["response"]["body"]
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert errors["streamed"]["response"]["status_code"] == 400
    assert errors["streamed"]["response"]["body"]["error"]["param"] == "stream"
    assert errors["no-model"]["response"]["status_code"] == 404
    assert errors["no-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert errors["bad-type"]["response"]["body"]["error"]["param"] == "temperature"
    assert errors["too-long"]["response"]["body"]["error"]["param"] == "max_tokens"
    assert "messages" in errors["not-chat"]["response"]["body"]["error"]["message"]
    # The same body sent over HTTP gets the same error.
    res = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=lines[3]["body"],
        headers={"Authorization": "Bearer sk-batch"},
    )
    assert error_of(res, 400) == errors["bad-type"]["response"]["body"]["error"]


def test_a_url_that_is_not_the_batch_endpoint_fails_validation(server: LiveServer) -> None:
    client = _client(server, "sk-batch")
    lines = [
        _line("a", _chat("Hi")),
        _line("b", {"model": "embedding", "input": "x"}, "/v1/embeddings"),
        _line("c", _chat("Hi"), "/v1/completions"),
    ]
    batch = _wait(client, _submit(client, lines).id)
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert batch.errors is not None and batch.errors.data is not None
    assert [(e.line, e.param) for e in batch.errors.data] == [(2, "url"), (3, "url")]


def test_hostile_uploads_and_ids_are_refused(server: LiveServer) -> None:
    client = _client(server, "sk-batch")

    def refused(content: bytes, purpose: str = "batch") -> str:
        with pytest.raises(openai.BadRequestError) as caught:
            client.files.create(file=("x.jsonl", content), purpose=purpose)  # type: ignore[arg-type]
        return str(caught.value)

    assert "line 2" in refused(_jsonl([_line("a", _chat("Hi"))]) + b"{not json\n")
    assert "line 1" in refused(b"[1, 2, 3]\n")
    assert "custom_id" in refused(_jsonl([_line("a", _chat("Hi")), _line("a", _chat("Yo"))]))
    assert "body" in refused(_jsonl([_line("a", "a string")]))  # type: ignore[arg-type]
    assert "method" in refused(_jsonl([{**_line("a", _chat("Hi")), "method": "GET"}]))
    assert "unknown field" in refused(_jsonl([{**_line("a", _chat("Hi")), "extra": 1}]))
    assert "BATCH_MAX_LINE_BYTES" in refused(_jsonl([_line("a", _chat("x" * 30_000))]))
    assert "BATCH_MAX_LINES" in refused(_jsonl([_line(str(i), _chat("Hi")) for i in range(51)]))
    assert "no requests" in refused(b"\n\n")
    assert "line 1" in refused(b'{"custom_id": "\xff"}\n')  # not UTF-8
    assert "purpose" in refused(_jsonl([_line("a", _chat("Hi"))]), purpose="assistants")
    # Over BATCH_MAX_FILE_BYTES: the body limit answers before the upload is read.
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.jsonl", b"x" * 300_000), purpose="batch")
    assert caught.value.status_code == 413

    for bad in ("../../etc/passwd", "file-..%2F..%2Fetc", "file-0000", "file-" + "a" * 24, "%00", "batch_" + "0" * 24):
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(bad)
        with pytest.raises(openai.NotFoundError):
            client.files.content(bad)
        with pytest.raises((openai.NotFoundError, openai.BadRequestError)):
            client.batches.create(input_file_id=bad, endpoint=CHAT, completion_window="24h")
    for bad in ("../batches", "batch_" + "f" * 24, "file-" + "0" * 24):
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve(bad)
        with pytest.raises(openai.NotFoundError):
            client.batches.cancel(bad)
    key = {"Authorization": "Bearer sk-batch"}
    raw = httpx.get(f"{server.url}/v1/files/..%2F..%2Fsettings.py/content", headers=key)
    assert raw.status_code == 404

    # A batch's input must be an upload, not a result; a window other than 24h is refused.
    batch = _wait(client, _submit(client, [_line("a", _chat("Hi", max_tokens=2))]).id)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.batches.create(input_file_id=batch.output_file_id or "", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=batch.input_file_id, endpoint=CHAT, completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=batch.input_file_id, endpoint="/v1/responses", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="cannot be cancelled"):
        client.batches.cancel(batch.id)


def test_files_and_batches_need_the_key_and_list_delete(server: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        _client(server, "wrong").files.list()
    with pytest.raises(openai.AuthenticationError):
        _client(server, "wrong").batches.list()
    client = _client(server, "sk-batch")
    upload = client.files.create(file=("mine.jsonl", _jsonl([_line("a", _chat("Hi", max_tokens=2))])), purpose="batch")
    assert client.files.retrieve(upload.id).filename == "mine.jsonl"
    assert client.files.content(upload.id).content == _jsonl([_line("a", _chat("Hi", max_tokens=2))])
    for _ in range(2):
        client.files.create(file=("more.jsonl", _jsonl([_line("b", _chat("Yo"))])), purpose="batch")
    listed = [f.id for f in client.files.list(purpose="batch")]
    assert upload.id in listed
    first_two = client.files.list(limit=2, order="asc")
    assert len(first_two.data) == 2 and first_two.has_more
    batches = client.batches.list(limit=100)
    assert all(b.object == "batch" for b in batches.data)
    deleted = client.files.delete(upload.id)
    assert deleted.deleted and deleted.id == upload.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(upload.id)
    assert upload.id not in [f.id for f in client.files.list()]


# -- cancel, priority, restart ----------------------------------------------------------------------


def _long_lines(count: int, max_tokens: int = 24) -> list[dict[str, Any]]:
    # Distinct prompts with a seed: no two lines replay each other from the cache.
    return [
        _line(f"l{i}", _chat(f"Write a story about the number {i}.", max_tokens=max_tokens, seed=i))
        for i in range(count)
    ]


def test_cancel_stops_a_batch_and_keeps_what_was_done(server: LiveServer) -> None:
    client = _client(server, "sk-batch")
    batch = _submit(client, _long_lines(30))
    _wait(client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 1)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = _wait(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    counts = done.request_counts
    assert counts is not None and 1 <= counts.completed < 30 and counts.failed == 0
    assert len(_results(client, done.output_file_id)) == counts.completed
    time.sleep(0.5)
    assert client.batches.retrieve(batch.id).request_counts == counts  # nothing ran after the cancel
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling again is harmless


def test_interactive_requests_go_ahead_of_queued_batch_lines(gemma_gguf: str) -> None:
    """One sequence at a time (MAX_BATCH=1) and four batch lines handed to the tier at once: an
    interactive request must wait at most for the line generating now, not for the queued ones."""
    env = {
        "LIGHT_MODEL_PATH": gemma_gguf,
        "LIGHT_N_CTX": "512",
        "LIGHT_N_THREADS": "1",
        "LIGHT_MAX_BATCH": "1",
        "BATCH_CONCURRENCY": "4",
    }
    with live_server(env, wait_for=("light",)) as live:
        client = _client(live)
        batch = _submit(client, _long_lines(16, max_tokens=16))
        _wait(client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 2)
        for attempt in range(3):
            before = client.batches.retrieve(batch.id).request_counts
            answer = client.chat.completions.create(**_chat(f"Say yes {attempt}.", max_tokens=4))
            after = client.batches.retrieve(batch.id).request_counts
            assert answer.choices[0].message.content is not None
            assert before is not None and after is not None
            # Lines finished while the interactive request was served: the running one, and at
            # most one more that started before it arrived. FIFO would make it wait for four.
            assert after.completed - before.completed <= 2, (before, after)
        assert _wait(client, batch.id).status == "completed"


def test_a_restart_resumes_the_batch_without_rerunning_done_lines(gemma_gguf: str, tmp_path: Path) -> None:
    env = {
        "LIGHT_MODEL_PATH": gemma_gguf,
        "LIGHT_N_CTX": "512",
        "LIGHT_N_THREADS": "1",
        "BATCH_DIR": str(tmp_path),
    }
    lines = _long_lines(12, max_tokens=16)
    with live_server(env, wait_for=("light",)) as first:
        client = _client(first)
        batch = _submit(client, lines)
        _wait(client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 3)
    # Stopped mid-batch: the results written so far are on disk.
    partial = tmp_path / "batches" / f"{batch.id}.output.jsonl"
    before = {json.loads(line)["custom_id"]: line for line in partial.read_text().splitlines()}
    assert 3 <= len(before) < 12
    assert json.loads((tmp_path / "batches" / f"{batch.id}.json").read_text())["status"] == "in_progress"
    with partial.open("a") as f:
        f.write('{"id": "batch_req_torn", "custom_id": "l')  # the process died mid-write

    with live_server(env, wait_for=("light",)) as second:
        client = _client(second)
        resumed = client.batches.retrieve(batch.id)
        assert resumed.status in ("in_progress", "finalizing", "completed")
        assert resumed.request_counts is not None and resumed.request_counts.completed >= len(before)
        done = _wait(client, batch.id)
        assert done.status == "completed"
        assert done.request_counts is not None and done.request_counts.model_dump() == {
            "total": 12,
            "completed": 12,
            "failed": 0,
        }
        results = _results(client, done.output_file_id)
        assert set(results) == {f"l{i}" for i in range(12)}
        output = client.files.content(done.output_file_id or "").text.splitlines()
        for custom_id, line in before.items():  # the lines done before the stop, exactly as written
            assert line in output, custom_id
