"""A generation tier served by a pool of OpenAI-compatible servers (`{TIER}_BACKEND=remote`).

No decode loop of ours: each `GenerationRequest` becomes one streamed `POST /chat/completions`
(or `/completions` for a prompt) to one upstream, and its SSE chunks become our `Chunk`s, read
only as fast as our client takes them. The pool is the tier's executor (it has the shape of
`service.tiers.executor.Executor`): no model thread, no tokenizer.

Structured deltas are written in the text forms the answer parsers already read, so chat,
Responses, Messages and the WebSocket work over any chat upstream unchanged: reasoning as
`<think>…</think>` (the tier's reasoning format) and tool calls as Hermes `<tool_call>{json}</tool_call>`.

The pool: least outstanding requests with affinity. A conversation seen before (its first
messages, or the client's key) goes back to the upstream that answered it, whose prefix cache holds
it, while that upstream is healthy and not far busier than the least busy one; a new one has no
cache to lose, so it goes to the least busy (ties broken by rendezvous hashing, so fronts agree),
and 8 new conversations split 4/4 over two upstreams, not 5/3. A request is retried on
another upstream only until its first chunk reached us, never after; an upstream that refuses
connections or times out is ejected at once, one answering 5xx or garbage after `_MAX_FAILURES`
in a row; it returns after `REMOTE_COOLDOWN` seconds once a health check (`GET /models`) passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import time
import urllib.request
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import msgspec

from backends.base import Chunk, FinishReason, GenerationRequest, Token, TokenLogprob, Usage, template_variables
from backends.reasoning import THINK_CLOSE, THINK_OPEN, ReasoningFormat
from backends.remote_http import PlainTransport
from kernel.config import TierSettings
from kernel.errors import (
    InvalidRequestError,
    LLMServiceError,
    ModelUnavailableError,
    RateLimitError,
    UpstreamError,
    UpstreamUnavailableError,
)

log = logging.getLogger(__name__)

_MAX_FAILURES = 3  # 5xx or garbage answers in a row that eject an upstream
_AFFINITY_SLACK = 2  # requests more than the least busy upstream that an affinity target may have
_HOMES = 16384  # conversations whose upstream the pool remembers (~100 bytes each)
_JSON = msgspec.json.Encoder()
_HEALTH_TIMEOUT = 5.0  # seconds a health check may take
# The answer parsers read thinking between these markers (no generation prompt opens them here).
REMOTE_REASONING = ReasoningFormat(THINK_OPEN, THINK_CLOSE, False, opened_if_on=False, opened_if_off=False)


class _Running(Protocol):
    """A request answering from an upstream, which `stop` cancels."""

    def cancel(self) -> None: ...


class _Retry(Exception):
    """This upstream failed before the request's first chunk: try another one."""

    def __init__(self, reason: str, *, eject: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.eject = eject  # at once (refused connection, timeout), else after _MAX_FAILURES in a row


@dataclass(eq=False)
class Upstream:
    """One server of the pool and what the pool knows of it."""

    url: str  # base URL ending in /v1
    model: str = ""  # the model name it is sent (REMOTE_MODEL, else its first listed model)
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    failures: int = 0  # in a row
    ejected_until: float | None = None  # monotonic time; None: healthy
    ejections: int = 0
    last_error: str | None = None
    _endpoints: dict[str, httpx.URL] = dataclasses.field(default_factory=dict)

    def endpoint(self, path: str) -> httpx.URL:
        """`url` + `path`, parsed once: httpx's URL parser cost ~0.1 ms a request on the hot path."""
        if (parsed := self._endpoints.get(path)) is None:
            parsed = self._endpoints[path] = httpx.URL(f"{self.url}{path}")
        return parsed

    @property
    def healthy(self) -> bool:
        return self.ejected_until is None

    def view(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "model": self.model or None,
            "state": "healthy" if self.healthy else "ejected",
            "in_flight": self.in_flight,
            "requests": self.requests,
            "errors": self.errors,
            "ejections": self.ejections,
            "last_error": self.last_error,
        }


class RemotePool:
    """A remote tier's upstreams and the requests running on them (the tier's executor). Generation
    streams through `submit`; embedding and rerank tiers send whole requests through `post`, their
    families turning the answers into their own types (embedders/remote.py, rerankers/remote.py)."""

    name = "remote"

    def __init__(self, tier: TierSettings) -> None:
        self.tier = tier.name
        self.upstreams = [Upstream(url, tier.remote_model) for url in tier.upstreams]
        self.timeout = tier.remote_timeout
        self.max_inflight = tier.remote_max_inflight
        self.cooldown = tier.remote_cooldown
        self.max_queue = tier.max_queue
        self.api_key = tier.remote_api_key
        self._headers = {"Authorization": f"Bearer {tier.remote_api_key}"} if tier.remote_api_key else {}
        self._client: httpx.AsyncClient | None = None
        self._plain: PlainTransport | None = None  # the client's transport for http:// upstreams
        # What httpx's client would add that a gateway may want; not Accept-Encoding: SSE comes plain.
        self._post_headers = {"Content-Type": "application/json", "User-Agent": "llmservice", **self._headers}
        self._timeouts = httpx.Timeout(tier.remote_timeout).as_dict()
        self._health: asyncio.Task[None] | None = None
        self._room = asyncio.Event()  # set when an upstream frees room or returns
        self._waiting = 0
        self._streams: set[_Running] = set()  # translated streams and relayed ones (backends.remote_relay)
        self._homes: OrderedDict[bytes, Upstream] = OrderedDict()  # conversation → the upstream that has its prefix
        self._stopping = False
        self.processed = 0
        self.started = time.monotonic()
        self.finished_at = time.time()  # wall clock of the last request's end, for idle unloading

    # -- the engine side: what the family's load and the views read ------------------------------
    def load(self) -> int | None:
        """Ask each upstream for its models (sync: the registry loads on a thread); returns the
        context length the first one reports, if any. Unreachable upstreams start ejected."""
        context: int | None = None
        with httpx.Client(timeout=min(self.timeout, _HEALTH_TIMEOUT), headers=self._headers) as client:
            for upstream in self.upstreams:
                try:
                    models = _models(client.get(f"{upstream.url}/models"))
                except _CHECK_ERRORS as exc:
                    self._check_failed(upstream, "GET /models failed at start", exc)
                    continue
                upstream.model = upstream.model or _first_model(models)
                context = context or _context_length(models, upstream.model)
        if not any(u.healthy for u in self.upstreams):
            log.warning("Tier %s: no upstream answered yet; requests get 503 until one does", self.tier)
        return context

    def close(self) -> None:
        """Nothing held outside the event loop (`stop`/`retire` close the connections)."""

    # -- the executor side (service.tiers.executor.Executor) ------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._streams) + self._waiting

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def interactive_waiting(self) -> int:
        return self._waiting

    @property
    def busy(self) -> bool:
        return bool(self._streams)

    def set_queue_limit(self, limit: int) -> None:
        self.max_queue = limit

    async def retire(self) -> bool:
        self._stopping = True
        while self._streams:
            self._room.clear()
            await self._room.wait()  # set as each request ends
        await self._shutdown()
        return True

    async def stop(self) -> bool:
        self._stopping = True
        for stream in list(self._streams):
            stream.cancel()
        await self._shutdown()
        return True

    def view(self) -> dict[str, Any]:
        self._ensure_started()
        return {
            "engine": "remote",
            "running": len(self._streams),
            "waiting": self._waiting,
            "processed": self.processed,
            "upstreams": [u.view() for u in self.upstreams],
        }

    async def run(self, fn: Callable[[], None]) -> None:
        raise InvalidRequestError(f"Tier {self.tier} is remote: it has no model of ours to run this on")

    def submit(self, request: GenerationRequest, *, background: bool = False) -> RemoteStream:
        """The request's chunks, from the first upstream that starts answering it."""
        if self._stopping:
            raise ModelUnavailableError(f"Tier {self.tier} is shutting down")
        if request.adapter is not None:
            raise InvalidRequestError(f"Tier {self.tier} is remote: it has no LoRA adapters", param="adapter")
        if request.prompt_logprobs:
            raise InvalidRequestError(f"Tier {self.tier} is remote: echo with logprobs is not supported", param="echo")
        self._ensure_started()
        if not self._usable():  # refused before the answer starts: an overflow keeps its own tier's 429
            raise UpstreamUnavailableError(self._no_upstream(), retry_after=self.cooldown)
        return RemoteStream(self, request)

    async def post(self, path: str, body: dict[str, Any], key: bytes) -> Any:
        """One whole JSON answer to `POST <upstream>/<path>` (embedding and rerank tiers), with the
        pool's balancing, retries on another upstream and ejections; `key` for affinity."""
        self._ensure_started()
        assert self._client is not None
        tried: set[int] = set()
        while True:
            upstream = await self._acquire(key, tried)
            try:
                return await self._post_once(upstream, path, body)
            except _Retry as exc:
                self._failed(upstream, exc)
                tried.add(id(upstream))
            finally:
                self._release(upstream)
                self.finished_at = time.time()

    async def _post_once(self, upstream: Upstream, path: str, body: dict[str, Any]) -> Any:
        assert self._client is not None
        try:
            response = await self._client.post(f"{upstream.url}{path}", json={"model": upstream.model, **body})
        except httpx.TimeoutException:
            raise _Retry(f"no answer within {self.timeout:g} s", eject=True) from None
        except httpx.HTTPError as exc:
            raise _Retry(_describe(exc), eject=True) from None
        if response.status_code >= 400:
            await _refuse(response)
        try:
            answer = response.json()
        except ValueError:
            raise _Retry("answered with something that is not JSON", eject=False) from None
        self._succeeded(upstream)
        self.processed += 1
        return answer

    def probe(self, path: str, body: dict[str, Any]) -> Any:
        """The first healthy upstream's JSON answer to a small request, at load (sync, on the
        registry's thread): what the served model is like (an embedding's dimension); None if none answers."""
        with httpx.Client(timeout=self.timeout, headers=self._headers) as client:
            for upstream in (u for u in self.upstreams if u.healthy):
                try:
                    res = client.post(f"{upstream.url}{path}", json={"model": upstream.model, **body})
                    res.raise_for_status()
                    return res.json()
                except (httpx.HTTPError, ValueError) as exc:
                    log.warning("Tier %s: %s %s failed at load: %s", self.tier, upstream.url, path, _describe(exc))
        return None

    async def tokenize(self, request: GenerationRequest) -> list[int]:
        """The prompt's tokens as an upstream counts them: `POST /v1/tokenize` (llmservice), `/tokenize`
        at the server's root (vLLM; llama-server, after `/apply-template` for a chat)."""
        chat = request.messages is not None
        body: dict[str, Any] = {"messages": list(request.messages or ())} if chat else {"prompt": request.prompt}
        if request.tools:
            body["tools"] = list(request.tools)
        answer = await self._utility(request, "tokenize", body, "tokens")
        if answer is None and chat:  # llama-server: its template, then its tokenizer
            rendered = await self._utility(request, "apply-template", body, "prompt")
            if isinstance(rendered, str):
                answer = await self._utility(
                    request, "tokenize", {"content": rendered, "parse_special": True}, "tokens"
                )
        elif answer is None and isinstance(request.prompt, str):
            answer = await self._utility(
                request, "tokenize", {"content": request.prompt, "add_special": True}, "tokens"
            )
        if not isinstance(answer, list) or not all(isinstance(t, int) for t in answer):
            raise InvalidRequestError(
                f"Tier {self.tier} is remote and its upstreams offer no tokenizer", code="remote_tier"
            )
        return answer

    async def detokenize(self, tokens: list[int]) -> str:
        request = GenerationRequest(prompt=tokens)
        for field in ("prompt", "content"):  # llmservice and vLLM answer `prompt`, llama-server `content`
            text = await self._utility(request, "detokenize", {"tokens": tokens}, field)
            if isinstance(text, str):
                return text
        raise InvalidRequestError(
            f"Tier {self.tier} is remote and its upstreams offer no tokenizer", code="remote_tier"
        )

    async def _utility(self, request: GenerationRequest, name: str, body: dict[str, Any], field: str) -> Any:
        """`field` of the first answer to `POST <base>/<name>` then `POST <root>/<name>` on the
        request's upstream; None where neither has it."""
        self._ensure_started()
        assert self._client is not None
        upstream = self._pick(_affinity_key(request), set())
        if upstream is None:
            raise UpstreamUnavailableError(self._no_upstream(), self.cooldown)
        root = upstream.url.removesuffix("/v1")
        for url in dict.fromkeys((f"{upstream.url}/{name}", f"{root}/{name}")):
            try:
                res = await self._client.post(url, json={"model": upstream.model, **body})
                value = res.json().get(field) if res.status_code == 200 else None
            except (httpx.HTTPError, ValueError, AttributeError):
                continue
            if value is not None:
                return value
        return None

    # -- the pool ---------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        """The connection pool and the health checks, on the event loop the requests run on."""
        if self._client is not None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        idle = self.max_inflight * len(self.upstreams)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=idle)
        # Plain-http upstreams on our own transport (~1.5 ms a request less); with a proxy in the
        # environment every request stays on httpx's, which honours it.
        self._plain = None if urllib.request.getproxies() else PlainTransport(self.max_inflight)
        mounts = {"http://": self._plain} if self._plain else {}
        self._client = httpx.AsyncClient(limits=limits, headers=self._headers, timeout=self.timeout, mounts=mounts)
        self._health = asyncio.create_task(self._check_health(), name=f"remote-health-{self.tier}")

    async def _shutdown(self) -> None:
        if self._health is not None:
            self._health.cancel()
        if self._client is not None:
            await self._client.aclose()

    def _usable(self) -> bool:
        """Whether some upstream is healthy, or ejected with its cool-down over (worth a try)."""
        now = time.monotonic()
        return any(u.ejected_until is None or u.ejected_until <= now for u in self.upstreams)

    def _no_upstream(self) -> str:
        return f"Tier {self.tier}: no upstream is available ({self._reasons()})"

    def _pick(self, key: bytes, tried: set[int]) -> Upstream | None:
        """The conversation's home (the upstream that answered it before) if it is healthy, has room
        and is not much busier than the least busy upstream; else the least busy, ties broken by
        rendezvous hashing. Ejected ones past their cool-down are a last resort."""
        now = time.monotonic()
        room = [u for u in self.upstreams if id(u) not in tried and u.in_flight < self.max_inflight]
        healthy = [u for u in room if u.healthy]
        pool = healthy or [u for u in room if u.ejected_until is not None and u.ejected_until <= now]
        if not pool:
            return None
        fewest = min(u.in_flight for u in pool)
        home = self._homes.get(_digest(key))
        if home is not None and home in pool and home.in_flight <= fewest + _AFFINITY_SLACK:
            return home
        least = [u for u in pool if u.in_flight == fewest]
        return max(least, key=lambda u: hashlib.blake2b(key + u.url.encode(), digest_size=8).digest())

    def _settle(self, key: bytes, upstream: Upstream) -> None:
        """`upstream` answered the conversation: its next turns go there while it is not much busier."""
        digest = _digest(key)
        self._homes[digest] = upstream
        self._homes.move_to_end(digest)
        if len(self._homes) > _HOMES:
            self._homes.popitem(last=False)

    async def _acquire(self, key: bytes, tried: set[int]) -> Upstream:
        """An upstream with room, counted as in flight: waiting while every healthy one is full (up
        to the queue's bound); a 503 once every upstream is tried or ejected."""
        while (upstream := self._pick(key, tried)) is None:
            if all(id(u) in tried or not u.healthy for u in self.upstreams):
                raise UpstreamUnavailableError(self._no_upstream(), retry_after=self.cooldown)
            if self._waiting >= self.max_queue:
                raise RateLimitError(f"Tier {self.tier}: every upstream is busy and the queue is full", retry_after=1)
            self._room.clear()
            self._waiting += 1
            try:
                await self._room.wait()
            finally:
                self._waiting -= 1
        upstream.in_flight += 1
        upstream.requests += 1
        return upstream

    def _release(self, upstream: Upstream) -> None:
        upstream.in_flight -= 1
        self._room.set()

    def _reasons(self) -> str:
        return "; ".join(f"{u.url}: {u.last_error or 'busy'}" for u in self.upstreams)

    def _eject(self, upstream: Upstream, reason: str) -> None:
        if upstream.healthy:
            upstream.ejections += 1
            log.warning("Tier %s: upstream %s ejected for %g s: %s", self.tier, upstream.url, self.cooldown, reason)
        upstream.ejected_until = time.monotonic() + self.cooldown
        upstream.last_error = reason

    def _failed(self, upstream: Upstream, exc: _Retry) -> None:
        upstream.errors += 1
        upstream.failures += 1
        upstream.last_error = exc.reason
        if exc.eject or upstream.failures >= _MAX_FAILURES:
            self._eject(upstream, exc.reason)

    def _succeeded(self, upstream: Upstream) -> None:
        upstream.failures = 0

    async def _check_health(self) -> None:
        """Every few seconds: each healthy upstream still answers; each ejected one whose cool-down
        is over answers again (then it returns)."""
        tick = min(self.cooldown, 5.0)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            due = [u for u in self.upstreams if u.ejected_until is None or u.ejected_until <= now]
            await asyncio.gather(*(self._probe(u) for u in due))

    def _check_failed(self, upstream: Upstream, what: str, exc: BaseException) -> None:
        upstream.errors += 1
        self._eject(upstream, f"{what}: {_describe(exc)}")

    async def _probe(self, upstream: Upstream) -> None:
        assert self._client is not None
        try:
            timeout = min(self.timeout, _HEALTH_TIMEOUT)
            models = _models(await self._client.get(f"{upstream.url}/models", timeout=timeout))
        except _CHECK_ERRORS as exc:
            self._check_failed(upstream, "health check", exc)
            return
        upstream.model = upstream.model or _first_model(models)
        if not upstream.healthy:
            log.info("Tier %s: upstream %s is back", self.tier, upstream.url)
            upstream.ejected_until, upstream.failures = None, 0
            self._room.set()

    async def events(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """The request's chunks: retried on another upstream until the first one came, never after."""
        path = "/chat/completions" if request.messages is not None else "/completions"
        key = _affinity_key(request)
        tried: set[int] = set()
        while True:
            upstream = await self._acquire(key, tried)
            try:
                async with contextlib.AsyncExitStack() as stack:
                    lines = await stack.enter_async_context(self._open(upstream, path, request))
                    reader = _ChunkReader(request.messages is not None, request.stop)
                    first = await self._first(upstream, lines, reader)
                    self._succeeded(upstream)
                    self._settle(key, upstream)
                    for chunk in first:
                        yield chunk
                    async for chunk in self._rest(upstream, lines, reader):
                        yield chunk
                    return
            except _Retry as exc:
                self._failed(upstream, exc)
                tried.add(id(upstream))
                log.info("Tier %s: %s failed before the first chunk (%s); retrying", self.tier, upstream.url, exc)
            finally:
                self._release(upstream)
                self.finished_at = time.time()

    async def _send(
        self, upstream: Upstream, path: str, body: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """POST `body` to `upstream`, its answer streamed (translated requests and relayed ones)."""
        assert self._client is not None
        url = upstream.endpoint(path)
        sent = {**self._post_headers, **headers} if headers else self._post_headers
        extensions = {"timeout": self._timeouts}
        request = httpx.Request("POST", url, headers=sent, content=_JSON.encode(body), extensions=extensions)
        # The hot path: plain-http upstreams straight to our transport, past httpx's client layer
        # (its auth, cookies, redirects and hooks, none of which a relay uses: ~0.7 ms a request).
        if self._plain is not None and url.scheme == "http":
            send = self._plain.handle_async_request
        else:
            send = functools.partial(self._client.send, stream=True)
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    return await send(request)
                except httpx.RemoteProtocolError:
                    # A kept-alive connection the upstream closed as we reused it (llama-server drops
                    # one idle for 5 s): nothing was answered, so once more on a fresh one, no ejection.
                    return await send(request)
        except TimeoutError:
            raise _Retry(f"no answer within {self.timeout:g} s", eject=True) from None
        except httpx.HTTPError as exc:
            raise _Retry(_describe(exc), eject=True) from None

    @contextlib.asynccontextmanager
    async def _open(self, upstream: Upstream, path: str, request: GenerationRequest) -> AsyncIterator[_Lines]:
        response = await self._send(
            upstream, path, request_body(request, upstream.model, chat=request.messages is not None)
        )
        try:
            if response.status_code >= 400:
                await _refuse(response)
            yield _Lines(response)
        finally:
            await response.aclose()

    async def _first(self, upstream: Upstream, lines: _Lines, reader: _ChunkReader) -> list[Chunk]:
        """Read until the upstream produced something to send (or ended): retryable failures here."""
        try:
            async for data in lines:
                if chunks := reader.feed(data):
                    return chunks
            return reader.finish()
        except httpx.TimeoutException:
            raise _Retry(f"no chunk within {self.timeout:g} s", eject=True) from None
        except httpx.HTTPError as exc:
            raise _Retry(_describe(exc), eject=True) from None
        except UpstreamError as exc:
            raise _Retry(exc.message, eject=False) from None

    async def _rest(self, upstream: Upstream, lines: _Lines, reader: _ChunkReader) -> AsyncIterator[Chunk]:
        """After the first chunk: a failure ends the stream with an error (the client has text already)."""
        try:
            async for data in lines:
                for chunk in reader.feed(data):
                    yield chunk
            for chunk in reader.finish():
                yield chunk
        except (httpx.HTTPError, UpstreamError) as exc:
            timeout = isinstance(exc, httpx.TimeoutException)
            reason = f"no chunk within {self.timeout:g} s" if timeout else _describe(exc)
            upstream.errors += 1
            upstream.last_error = reason
            raise UpstreamError(f"Upstream {upstream.url} failed mid-stream: {reason}") from None
        self.processed += 1


class _Lines:
    """An SSE response's `data:` payloads; `[DONE]` ends them. The client's read timeout bounds the
    wait for each (`REMOTE_TIMEOUT` between chunks): no timer of ours per line."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> str:
        async for line in self._lines:
            if not line.startswith("data:"):
                continue  # blank separators, comments, `event:` lines
            data = line[5:].strip()
            if data == "[DONE]":
                # Read to the body's end: a response closed unread loses its keep-alive connection,
                # and the next request paid a new TCP connection (~1 ms) before its first byte.
                async for _ in self._lines:
                    pass
                break
            return data
        raise StopAsyncIteration


class RemoteStream:
    """One request's chunks as a `ChunkStream`; cancelling it closes the upstream request."""

    def __init__(self, pool: RemotePool, request: GenerationRequest) -> None:
        self._pool = pool
        self._events = pool.events(request)
        self._running = False
        self._closed = False
        pool._streams.add(self)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        if self._closed:
            raise StopAsyncIteration
        self._running = True
        try:
            return await anext(self._events)
        except StopAsyncIteration:
            self._end()
            raise
        except LLMServiceError:
            self._end()
            raise
        except BaseException:
            self._running = False
            self.cancel()
            raise
        finally:
            self._running = False

    def _end(self) -> None:
        self._closed = True
        self._pool._streams.discard(self)
        self._pool._room.set()  # `retire` waits for the last stream

    def cancel(self) -> None:
        if self._closed:
            return
        self._end()
        if not self._running:  # a generator being awaited is closed by the cancellation itself
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(self._events.aclose())


_decode = msgspec.json.Decoder().decode


def _decode_event(data: str) -> Any:
    """One upstream event, per token: msgspec's decoder is ~4x the standard library's, which stays
    the fallback for what Python servers may send and msgspec refuses (`NaN`, `-Infinity`)."""
    try:
        return _decode(data)
    except msgspec.DecodeError:
        return json.loads(data)


class _ChunkReader:
    """Upstream SSE payloads → our chunks: text (reasoning and tool calls in the parsers' text
    forms), logprobs, then one final chunk with the finish reason, usage and the stop string that
    ended the answer where the upstream names it (vLLM's `stop_reason`, SGLang's `matched_stop`;
    llama-server's and llmservice's OpenAI chunks do not say: their answers name no stop string)."""

    def __init__(self, chat: bool, stops: tuple[str, ...] = ()) -> None:
        self._chat = chat
        self._stops = stops
        self._stop: str | None = None
        self._thinking = False
        self._calls: dict[int, dict[str, str]] = {}
        self._finish: FinishReason | None = None
        self._usage: Usage | None = None
        self._chars = 0

    def feed(self, data: str) -> list[Chunk]:
        try:
            event = _decode_event(data)
        except ValueError:
            raise UpstreamError(f"the upstream sent an event that is not JSON: {data[:80]!r}") from None
        if not isinstance(event, dict):
            raise UpstreamError("the upstream sent an event that is not a JSON object")
        if "error" in event:
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise UpstreamError(f"the upstream failed: {message}")
        if isinstance(usage := event.get("usage"), dict):
            details = usage.get("prompt_tokens_details") or {}
            self._usage = Usage(
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
                int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
            )
        choices = event.get("choices")
        if not isinstance(choices, list):
            raise UpstreamError("the upstream sent an event without choices")
        chunks = []
        for choice in choices[:1]:
            text, scored = self._choice(choice)
            if text or scored:
                self._chars += len(text)
                chunks.append(Chunk(text, scored=scored))
            if reason := choice.get("finish_reason"):
                self._finish = "length" if reason == "length" else "stop"
            matched = choice.get("stop_reason", choice.get("matched_stop"))
            if isinstance(matched, str) and matched in self._stops:  # not a stop token's id
                self._stop = matched
        return chunks

    def _choice(self, choice: dict[str, Any]) -> tuple[str, tuple[Token, ...]]:
        if not self._chat:
            return str(choice.get("text") or ""), _completion_scores(choice.get("logprobs"))
        delta = choice.get("delta") or {}
        text = ""
        if reasoning := delta.get("reasoning_content") or delta.get("reasoning"):
            text += ("" if self._thinking else THINK_OPEN) + reasoning
            self._thinking = True
        if content := delta.get("content"):
            text += self._close_thinking() + content
        for call in delta.get("tool_calls") or ():
            text += self._close_thinking()
            slot = self._calls.setdefault(int(call.get("index", len(self._calls))), {"name": "", "arguments": ""})
            function = call.get("function") or {}
            slot["name"] += function.get("name") or ""
            slot["arguments"] += function.get("arguments") or ""
        return text, _chat_scores(choice.get("logprobs"))

    def _close_thinking(self) -> str:
        if not self._thinking:
            return ""
        self._thinking = False
        return THINK_CLOSE + "\n\n"

    def finish(self) -> list[Chunk]:
        """The held tool calls, then the final chunk (usage estimated where the upstream sent none)."""
        text = self._close_thinking()
        for call in (self._calls[i] for i in sorted(self._calls)):
            try:
                arguments: Any = json.loads(call["arguments"] or "{}")
            except ValueError:
                arguments = call["arguments"]
            text += f"<tool_call>\n{json.dumps({'name': call['name'], 'arguments': arguments})}\n</tool_call>"
        self._calls.clear()
        chunks = [Chunk(text)] if text else []
        usage = self._usage or Usage(0, max(1, self._chars // 4) if self._chars else 0)
        chunks.append(Chunk("", self._finish or "stop", usage, self._stop))
        return chunks


def request_body(request: GenerationRequest, model: str, *, chat: bool) -> dict[str, Any]:
    """The upstream request for `request`: OpenAI fields, plus llama-server's and vLLM's sampling
    extras only where they differ from off (an upstream that lacks them then never sees them)."""
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
    }
    if chat:
        body["messages"] = list(request.messages or ())
        if request.tools:
            body["tools"] = list(request.tools)
        if variables := template_variables(request):
            body["chat_template_kwargs"] = variables
        if request.thinking_budget is not None:  # llama-server's field; an upstream without it bounds by max_tokens
            body["thinking_budget_tokens"] = request.thinking_budget
        if request.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = request.top_logprobs
    else:
        body["prompt"] = request.prompt
        if request.logprobs:
            body["logprobs"] = request.top_logprobs
    if request.stop:
        body["stop"] = list(request.stop)
    if request.fixed_seed is not None:
        body["seed"] = request.fixed_seed
    if request.presence_penalty:
        body["presence_penalty"] = request.presence_penalty
    if request.frequency_penalty:
        body["frequency_penalty"] = request.frequency_penalty
    if request.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in request.logit_bias}
    if request.top_k:
        body["top_k"] = request.top_k
    if request.min_p:
        body["min_p"] = request.min_p
    if request.repeat_penalty != 1.0:
        body["repeat_penalty"] = body["repetition_penalty"] = request.repeat_penalty
    if (fmt := request.response_format) is not None:
        body["response_format"] = (
            {"type": "json_object"}
            if fmt.schema is None
            else {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt.schema, "strict": True}}
        )
    return body


async def _refuse(response: httpx.Response) -> None:
    """An upstream's error answer: 5xx is the upstream's fault (retry elsewhere), 4xx the request's
    (relayed as a 400 or 429 with its message; other 4xx say the pool is misconfigured: 502)."""
    status = response.status_code
    await response.aread()
    try:
        error = response.json().get("error")
        message = str(error.get("message") if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        message = response.text[:200]
    if status >= 500:
        raise _Retry(f"answered {status}: {message}", eject=False)
    if status == 429:
        retry = response.headers.get("Retry-After", "1")
        raise RateLimitError(f"The upstream is busy: {message}", retry_after=float(retry) if retry.isdigit() else 1)
    if status in (400, 413, 422):
        raise InvalidRequestError(f"The upstream refused the request: {message}")
    raise UpstreamError(f"The upstream answered {status}: {message}")


def _chat_scores(logprobs: Any) -> tuple[Token, ...]:
    if not isinstance(logprobs, dict):
        return ()
    return tuple(
        Token(
            item.get("token", ""),
            logprob=_logprob(item),
            top_logprobs=tuple(_logprob(alt) for alt in item.get("top_logprobs") or ()),
        )
        for item in logprobs.get("content") or ()
    )


def _logprob(item: dict[str, Any]) -> TokenLogprob:
    token = str(item.get("token", ""))
    raw = item.get("bytes")
    return TokenLogprob(token, float(item.get("logprob", 0.0)), bytes(raw) if raw else token.encode())


def _completion_scores(logprobs: Any) -> tuple[Token, ...]:
    """The legacy completions shape: parallel lists of tokens, their logprobs and top alternatives."""
    if not isinstance(logprobs, dict):
        return ()
    tokens, values = logprobs.get("tokens") or [], logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    return tuple(
        Token(
            token,
            logprob=TokenLogprob(token, float(value or 0.0), token.encode()),
            top_logprobs=tuple(TokenLogprob(t, float(v), t.encode()) for t, v in (top or {}).items()),
        )
        for token, value, top in zip(tokens, values, tops, strict=False)
    )


def _digest(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=16).digest()


def _affinity_key(request: GenerationRequest) -> bytes:
    """The client's key (`prompt_cache_key`, `user`) when it sent one; else what decides an upstream's
    prefix cache hit and stays put while a conversation grows: its messages up to the first user turn
    (system prompt included), or the prompt's first 2,000 characters."""
    if request.affinity is not None:
        return b"key:" + request.affinity.encode()
    head: Any = request.prompt[:2000]
    if request.messages is not None:
        first_user = next((i for i, m in enumerate(request.messages) if m.get("role") == "user"), 0)
        head = request.messages[: first_user + 1]
    return json.dumps(head, sort_keys=True, default=str).encode()


# What a GET /models can fail with: the connection, an error status, a body that is no model list.
_CHECK_ERRORS = (httpx.HTTPError, ValueError, KeyError, TypeError)


def _models(res: httpx.Response) -> Any:
    """The `data` of a GET /models answer (an error status raises)."""
    res.raise_for_status()
    return res.json()["data"]


def _first_model(models: Any) -> str:
    if isinstance(models, list) and models and isinstance(models[0], dict):
        return str(models[0].get("id", ""))
    return ""


def _context_length(models: Any, name: str) -> int | None:
    """The context a model listing reports: vLLM's `max_model_len`, ours, llama-server's `meta.n_ctx_train`."""
    for model in models if isinstance(models, list) else ():
        if not isinstance(model, dict) or model.get("id") != name:
            continue
        meta = model.get("meta")
        meta = meta if isinstance(meta, dict) else {}
        for value in (model.get("max_model_len"), model.get("context_length"), meta.get("n_ctx_train")):
            if isinstance(value, int) and value > 0:
                return value
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"answered {exc.response.status_code}"
    if isinstance(exc, LLMServiceError):
        return exc.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
