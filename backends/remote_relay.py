"""Responses and Messages requests passed straight to upstreams that serve those APIs
(`{TIER}_REMOTE_PASSTHROUGH=responses,messages`), on the same pool as the translated ones.

The body goes upstream as the client sent it, with `model` set to the upstream's model; the answer
comes back in the upstream's own format: a whole JSON body, or its SSE events one by one, read only
as fast as our client takes them, with the `model` they name set back to the one the client asked
for. The pool's rules hold: balancing with affinity, a retry on another upstream only before the
first event reached us, ejection for refused connections, timeouts and 5xx, the per-upstream limit.
An upstream's 4xx is the client's error: relayed with its status and body, never an ejection.
Usage is read from the answer (its `usage`, or the final event's), for our metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from backends.base import Usage
from backends.remote import RemotePool, Upstream, _describe, _Retry
from kernel.errors import ModelUnavailableError, UpstreamError, UpstreamUnavailableError

Api = Literal["responses", "messages"]
PATHS: dict[Api, str] = {"responses": "/responses", "messages": "/messages"}
ANTHROPIC_VERSION = "2023-06-01"  # sent when the client named none: Anthropic's API requires one


@dataclass(slots=True)
class Relayed:
    """An upstream's answer: `status` and `body` when whole (an answer or an error), else `events`
    (each SSE event's bytes as the upstream framed it). `usage` is filled as the answer is read."""

    status: int
    content_type: str
    body: bytes = b""
    events: RelayStream | None = None
    usage: Usage | None = None


def relay_headers(api: Api, api_key: str, client: Mapping[str, str]) -> dict[str, str]:
    """What the upstream needs beyond the pool's `Authorization`: Anthropic's key header and version
    (the client's, else the oldest stable one) and its beta flags, for Messages."""
    if api != "messages":
        return {}
    headers = {"anthropic-version": client.get("anthropic-version") or ANTHROPIC_VERSION}
    if beta := client.get("anthropic-beta"):
        headers["anthropic-beta"] = beta
    if api_key:
        headers["x-api-key"] = api_key
    return headers


def affinity_key(body: Mapping[str, Any]) -> bytes:
    """As for a translated request: the client's key (`prompt_cache_key`, `user`, Messages'
    `metadata.user_id`), else the conversation's head (instructions or system prompt, and the
    input up to its first user turn), which stays put while the conversation grows."""
    metadata = body.get("metadata")
    for key in (
        body.get("prompt_cache_key"),
        body.get("user"),
        metadata.get("user_id") if isinstance(metadata, dict) else None,
    ):
        if isinstance(key, str) and key:
            return b"key:" + key.encode()
    turns: Any = body.get("input", body.get("messages"))
    if isinstance(turns, list):
        first_user = next((i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("role") == "user"), 0)
        turns = turns[: first_user + 1]
    elif isinstance(turns, str):
        turns = turns[:2000]
    head = [body.get("instructions", body.get("system")), turns]
    return json.dumps(head, sort_keys=True, default=str).encode()


async def relay(
    pool: RemotePool, api: Api, body: dict[str, Any], model: str, client_headers: Mapping[str, str]
) -> Relayed:
    """Send `body` to an upstream's `/responses` or `/messages`; `model` is the name the client used,
    `client_headers` its request's (lower-case names). A streamed answer returns once its first
    event is in (so failures before it are retried)."""
    if pool._stopping:
        raise ModelUnavailableError(f"Tier {pool.tier} is shutting down")
    pool._ensure_started()
    if not pool._usable():
        raise UpstreamUnavailableError(pool._no_upstream(), retry_after=pool.cooldown)
    key = affinity_key(body)
    headers = relay_headers(api, pool.api_key, client_headers)
    tried: set[int] = set()
    while True:
        upstream = await pool._acquire(key, tried)
        stream: RelayStream | None = None
        try:
            sent = {**body, "model": upstream.model} if upstream.model else body
            response = await pool._send(upstream, PATHS[api], sent, headers)
            answer, stream = await _answer(pool, upstream, response, model, bool(body.get("stream")))
            pool._succeeded(upstream)
            pool._settle(key, upstream)  # its next turns go where its prefix is cached
            return answer
        except _Retry as exc:
            pool._failed(upstream, exc)
            tried.add(id(upstream))
        finally:
            if stream is None:  # else the stream releases it when it ends
                pool._release(upstream)
                pool.finished_at = time.time()


async def _answer(
    pool: RemotePool, upstream: Upstream, response: httpx.Response, model: str, streamed: bool
) -> tuple[Relayed, RelayStream | None]:
    """The answer, and the stream that now owns the response and the upstream's place, if streamed."""
    content_type = response.headers.get("content-type", "application/json")
    try:
        if response.status_code >= 400 or not streamed:
            try:
                body = await response.aread()
            except httpx.TimeoutException:
                raise _Retry(f"no answer within {pool.timeout:g} s", eject=True) from None
            except httpx.HTTPError as exc:
                raise _Retry(_describe(exc), eject=True) from None
            if response.status_code >= 500:
                raise _Retry(f"answered {response.status_code}: {body[:200]!r}", eject=False)
            if response.status_code >= 400:  # the client's error, in the upstream's own words
                return Relayed(response.status_code, content_type, body), None
            try:
                answer = json.loads(body)
            except ValueError:
                raise _Retry("answered with something that is not JSON", eject=False) from None
            usage = _usage(answer, None)
            if _rename(answer, model):
                body = json.dumps(answer).encode()
            pool.processed += 1
            return Relayed(200, content_type, body, usage=usage), None
        stream = RelayStream(pool, upstream, response, model)
        relayed = Relayed(200, content_type, events=stream)
        stream.answer = relayed
        try:
            await stream.start()
        except BaseException:
            await stream.aclose(release=False)  # the caller releases the upstream before its retry
            raise
        return relayed, stream
    finally:
        if response.status_code >= 400 or not streamed:
            await response.aclose()


class RelayStream:
    """A streamed answer's SSE events, as bytes; closing it (or cancelling it, when the pool stops)
    closes the upstream request and frees the upstream's place."""

    def __init__(self, pool: RemotePool, upstream: Upstream, response: httpx.Response, model: str) -> None:
        self._pool = pool
        self._upstream = upstream
        self._response = response
        self._lines = response.aiter_lines()
        self._model = model
        self._first: bytes | None = None
        self._closed = False
        self.answer: Relayed | None = None
        pool._streams.add(self)

    async def start(self) -> None:
        """Read the first event: failures until then are retried on another upstream."""
        try:
            self._first = await self._event(check=True)
        except httpx.TimeoutException:
            raise _Retry(f"no event within {self._pool.timeout:g} s", eject=True) from None
        except httpx.HTTPError as exc:
            raise _Retry(_describe(exc), eject=True) from None
        except UpstreamError as exc:
            raise _Retry(exc.message, eject=False) from None
        if self._first is None:
            raise _Retry("ended its stream without an event", eject=False)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events()

    async def _events(self) -> AsyncIterator[bytes]:
        """After the first event: a failure ends the stream with an `UpstreamError` (the client has events)."""
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
            while (event := await self._event()) is not None:
                yield event
            self._pool.processed += 1
        except (httpx.HTTPError, UpstreamError) as exc:
            timeout = isinstance(exc, httpx.TimeoutException)
            reason = f"no event within {self._pool.timeout:g} s" if timeout else _describe(exc)
            self._upstream.errors += 1
            self._upstream.last_error = reason
            raise UpstreamError(f"Upstream {self._upstream.url} failed mid-stream: {reason}") from None
        finally:
            await self.aclose()

    async def _event(self, *, check: bool = False) -> bytes | None:
        """The next SSE event (its lines up to the blank one), the model it names set to the client's
        and its usage noted; None at the end of the body. `check`: its data must be JSON (the first
        event: an upstream answering garbage is retried elsewhere)."""
        lines: list[str] = []
        async for line in self._lines:
            if line:
                lines.append(self._line(line, check) if line.startswith("data:") else line)
            elif lines:
                return ("\n".join(lines) + "\n\n").encode()
        return ("\n".join(lines) + "\n\n").encode() if lines else None

    def _line(self, line: str, check: bool) -> str:
        data = line[5:].strip()
        if not check and '"model"' not in data and '"usage"' not in data:
            return line  # most events (deltas): passed on untouched, unparsed
        try:
            event = json.loads(data)
        except ValueError:
            raise UpstreamError(f"the upstream sent an event that is not JSON: {data[:80]!r}") from None
        if self.answer is not None:
            self.answer.usage = _usage(event, self.answer.usage)
        return "data: " + json.dumps(event) if _rename(event, self._model) else line

    async def aclose(self, *, release: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        pool = self._pool
        pool._streams.discard(self)
        try:
            with contextlib.suppress(httpx.HTTPError):
                await self._response.aclose()
        finally:
            if release:
                pool._release(self._upstream)
                pool.finished_at = time.time()

    def cancel(self) -> None:
        """The pool is stopping: close the upstream request from the event loop."""
        if not self._closed:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(self.aclose())


def _rename(answer: Any, model: str) -> bool:
    """Set the `model` an answer or event names (at its top, in `response` or in `message`) to `model`."""
    changed = False
    if not isinstance(answer, dict):
        return False
    for holder in (answer, answer.get("response"), answer.get("message")):
        if isinstance(holder, dict) and isinstance(holder.get("model"), str) and holder["model"] != model:
            holder["model"] = model
            changed = True
    return changed


def _usage(answer: Any, known: Usage | None) -> Usage | None:
    """The usage an answer or event reports (Responses: `usage` or `response.usage`, input/output
    tokens; Messages: `usage` or `message.usage`, whose later events carry the output count), over
    what earlier events said."""
    if not isinstance(answer, dict):
        return known
    for holder in (answer, answer.get("response"), answer.get("message")):
        usage = holder.get("usage") if isinstance(holder, dict) else None
        if not isinstance(usage, dict):
            continue
        details = usage.get("input_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else usage.get("cache_read_input_tokens")
        prompt = _count(usage.get("input_tokens"))
        completion = _count(usage.get("output_tokens"))
        cached_count = _count(cached)
        if known is not None:
            prompt, completion = prompt or known.prompt_tokens, completion or known.completion_tokens
            cached_count = cached_count or known.cached_tokens
        return Usage(prompt, completion, cached_count)
    return known


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0
