"""Helpers for the continuous-batching tests (both engines): hold the worker, stream, compare."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from backends.base import Backend, GenerationRequest, Token
from service.tiers.workers import GenerationWorker
from tests.live import LiveServer


@dataclass
class Result:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int

    def opening(self) -> tuple[str, str | None, int, int]:
        """What must match when batch composition depends on timing: llama.cpp's CPU kernels round
        a batch of rows differently from one row, so a near-tie late in an answer can flip."""
        return self.text[:12], self.finish_reason, self.prompt_tokens, self.completion_tokens


def worker_of(server: LiveServer) -> GenerationWorker:
    worker: GenerationWorker | None = server.app.state.registry.slots["light"].worker
    assert worker is not None
    return worker


def wait_until(predicate: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@contextmanager
def held(server: LiveServer) -> Iterator[GenerationWorker]:
    """Keep the worker busy with a maintenance call, so requests queue up until the block ends."""
    worker, entered, gate = worker_of(server), threading.Event(), threading.Event()

    def block() -> None:
        entered.set()
        gate.wait(60)

    assert server.loop is not None
    done = asyncio.run_coroutine_threadsafe(worker.run(block), server.loop)
    assert entered.wait(30)
    try:
        yield worker
    finally:
        gate.set()
        done.result(30)


def three_streams_one_cut(server: LiveServer, cases: list[dict[str, Any]]) -> dict[int, Result]:
    """Three streams that start in one batch; the second client goes away after 3 chunks."""
    results: dict[int, Result] = {}
    worker = worker_of(server)

    def one(i: int) -> None:
        with server.client() as http:
            results[i] = stream(http, cases[i], stop_after=3 if i == 1 else None)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    with held(server):
        for t in threads:
            t.start()
        wait_until(lambda: worker.waiting == 3 and not worker.preparing)
    for t in threads:
        t.join(120)
    return results


def body_of(case: dict[str, Any]) -> dict[str, Any]:
    body = {"model": "light", "temperature": 0, "top_p": 1.0, "top_k": 0, **case}
    if "schema" in body:
        schema = body.pop("schema")
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    return body


def stream(http: httpx.Client, case: dict[str, Any], *, stop_after: int | None = None) -> Result:
    """One streamed request; `stop_after` chunks → disconnect early."""
    path = "/v1/chat/completions" if "messages" in case else "/v1/completions"
    body = {**body_of(case), "stream": True, "stream_options": {"include_usage": True}}
    parts: list[str] = []
    finish = None
    prompt_tokens = completion_tokens = 0
    with http.stream("POST", path, json=body) as res:
        assert res.status_code == 200, res.read()
        for line in res.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event.get("usage"):
                prompt_tokens = event["usage"]["prompt_tokens"]
                completion_tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
                finish = choice.get("finish_reason") or finish
            if stop_after is not None and len(parts) >= stop_after:
                break
    return Result("".join(parts), finish, prompt_tokens, completion_tokens)


def run_concurrently(server: LiveServer, cases: list[dict[str, Any]], **kw: Any) -> list[Result]:
    results: list[Result | BaseException | None] = [None] * len(cases)

    def one(i: int) -> None:
        try:
            with server.client() as http:
                results[i] = stream(http, cases[i], **kw)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    with held(server) as worker:
        for t in threads:
            t.start()
        wait_until(lambda: worker.waiting == len(cases) and not worker.preparing)
    for t in threads:
        t.join(120)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [r for r in results if isinstance(r, Result)]


def alone(backend: Backend, request: GenerationRequest) -> str:
    """A request's text decoded on its own, from a cold prefix cache."""
    backend.reset_prefix_cache()
    return "".join(c.text for c in backend.stream(request))


def together(backend: Backend, requests: Sequence[GenerationRequest]) -> list[str]:
    """The requests' texts, submitted at once to a worker that batches them (cold prefix cache)."""
    backend.reset_prefix_cache()

    async def main() -> list[str]:
        streams = [worker.submit(r) for r in requests]
        return ["".join(c.text for c in [c async for c in s]) for s in streams]

    worker = GenerationWorker("light", backend, max_queue=16)
    try:
        return asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        worker.close()


def batched(backend: Backend, requests: Sequence[GenerationRequest]) -> list[list[Token]]:
    """Every request joins one engine batch at once (cold prefix cache); each runs to its end or its
    `max_tokens`, and no sequence yields a token after it ended."""
    backend.reset_prefix_cache()
    batch = backend.open_batch()
    out: list[list[Token]] = [[] for _ in requests]
    try:
        for key, request in enumerate(requests):
            batch.add(key, backend.prepare(request))
        live = set(range(len(requests)))
        for _ in range(10 * max(r.max_tokens for r in requests) * len(requests)):
            if not live:
                break
            for key, token in batch.step():
                assert key in live, "a sequence produced a token after it ended"
                assert not isinstance(token, Exception), token
                if token is None:
                    live.discard(key)
                    continue
                out[key].append(token)
                if len(out[key]) == requests[key].max_tokens:
                    live.discard(key)
        assert not live
    finally:
        batch.close()
    return out
