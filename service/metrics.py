"""Request telemetry: the numbers behind `GET /v1/stats` and `GET /metrics`.

`TelemetryMiddleware` gives every request a `RequestRecord` (in `scope["state"]`, injected into
handlers as `record`), times it to the end of its body (a stream ends with its last event) and
adds `X-Process-Time`, `X-Cache` and the rate-limit headers. Handlers fill in what only they know:
the tier, the cache outcome, time to first token and token counts.

Each app owns its own `CollectorRegistry` (tests build many apps in one process). Live values
(queue depth, busy workers, model state, cache sizes) are read from the registry and the cache
when Prometheus scrapes, so nothing has to keep gauges in sync.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from backends.base import Backend
from service.cache import ResponseCache
from service.settings import GENERATION_TIERS, Settings
from service.tiers.registry import Registry
from service.tiers.slots import TierState

RECORD = "llmservice.record"  # key of the RequestRecord in scope["state"]
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_MAX_SAMPLES = 50_000


@dataclass(slots=True)
class RateLimitInfo:
    limit: int
    remaining: int
    reset: int  # seconds until the window starts afresh


@dataclass(slots=True)
class RequestRecord:
    route: str
    method: str
    started: float = field(default_factory=time.monotonic)
    observed: bool = True  # False for /health, /metrics, /v1/stats: monitoring is not traffic
    tier: str | None = None
    cache: str | None = None  # "hit" or "miss" when the request was cacheable
    ttft: float | None = None  # seconds from arrival to the first generated chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens an engine reused from its prefix/KV cache
    generated: bool = False  # an engine ran (not a cache replay)
    failed: bool = False  # an error after the response started (a stream's error event)
    rate_limit: RateLimitInfo | None = None


@dataclass(slots=True)
class _Sample:
    at: float
    tier: str | None
    ok: bool
    latency: float
    ttft: float | None
    completion_tokens: int


@dataclass(slots=True)
class _Totals:
    total: int = 0
    succeeded: int = 0
    failed: int = 0

    def add(self, ok: bool) -> None:
        self.total += 1
        if ok:
            self.succeeded += 1
        else:
            self.failed += 1

    def view(self) -> dict[str, int]:
        return {"total": self.total, "succeeded": self.succeeded, "failed": self.failed}


@dataclass(slots=True)
class PrefixCounts:
    """What engines report about prompt reuse (`usage.prompt_tokens_details.cached_tokens`)."""

    requests: int = 0
    hits: int = 0  # generations that reused at least one prompt token
    prompt_tokens: int = 0
    reused_tokens: int = 0


class Telemetry:
    def __init__(self, settings: Settings, registry: Registry, cache: ResponseCache) -> None:
        self.window = float(settings.stats_window_seconds)
        self.registry = registry
        self.cache = cache
        self.active = 0
        self.totals = _Totals()
        self.tier_totals: dict[str, _Totals] = {}
        self.prefix: dict[str, PrefixCounts] = {}
        self._samples: deque[_Sample] = deque(maxlen=_MAX_SAMPLES)

        self.prometheus = CollectorRegistry()
        reg = self.prometheus
        self._requests = Counter(
            "llmservice_requests", "HTTP requests", ["route", "method", "tier", "status"], registry=reg
        )
        self._latency = Histogram(
            "llmservice_request_duration_seconds",
            "Time from request to the end of the response body (streams included)",
            ["route", "tier"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self._ttft = Histogram(
            "llmservice_time_to_first_token_seconds",
            "Time from request to the first generated chunk (queueing included; cache hits excluded)",
            ["tier"],
            buckets=_TTFT_BUCKETS,
            registry=reg,
        )
        self._prompt_tokens = Counter("llmservice_prompt_tokens", "Prompt tokens processed", ["tier"], registry=reg)
        self._completion_tokens = Counter("llmservice_completion_tokens", "Tokens generated", ["tier"], registry=reg)
        self._reused_tokens = Counter(
            "llmservice_prefix_cache_reused_tokens",
            "Prompt tokens reused from an engine's KV cache",
            ["tier"],
            registry=reg,
        )
        reg.register(_LiveCollector(self))
        if sys.platform.startswith("linux"):
            ProcessCollector(registry=reg)

    # -- per request -------------------------------------------------------------------------
    def begin(self, route: str, method: str, observed: bool) -> RequestRecord:
        record = RequestRecord(route, method, observed=observed)
        if observed:
            self.active += 1
        return record

    def finish(self, record: RequestRecord, status: int) -> None:
        if not record.observed:
            return
        self.active -= 1
        latency = time.monotonic() - record.started
        ok = status < 400 and not record.failed
        tier = record.tier or "none"
        self.totals.add(ok)
        if record.tier:
            self.tier_totals.setdefault(record.tier, _Totals()).add(ok)
        self._requests.labels(record.route, record.method, tier, str(status)).inc()
        self._latency.labels(record.route, tier).observe(latency)
        if record.ttft is not None:
            self._ttft.labels(tier).observe(record.ttft)
        if record.generated:
            self._prompt_tokens.labels(tier).inc(record.prompt_tokens)
            self._completion_tokens.labels(tier).inc(record.completion_tokens)
            if record.tier in GENERATION_TIERS:
                prefix = self.prefix.setdefault(tier, PrefixCounts())
                prefix.requests += 1
                prefix.hits += record.cached_tokens > 0
                prefix.prompt_tokens += record.prompt_tokens
                prefix.reused_tokens += record.cached_tokens
                self._reused_tokens.labels(tier).inc(record.cached_tokens)
        tokens = record.completion_tokens if record.generated else 0
        self._samples.append(_Sample(time.monotonic(), record.tier, ok, latency, record.ttft, tokens))

    # -- views -----------------------------------------------------------------------------
    def _recent(self) -> list[_Sample]:
        horizon = time.monotonic() - self.window
        while self._samples and self._samples[0].at < horizon:
            self._samples.popleft()
        return list(self._samples)

    def _rates(self, samples: list[_Sample]) -> dict[str, Any]:
        span = max(1.0, min(self.window, self.registry.uptime()))
        latencies = [s.latency for s in samples]
        ttfts = [s.ttft for s in samples if s.ttft is not None]
        return {
            "requests_per_second": round(len(samples) / span, 3),
            "tokens_per_second": round(sum(s.completion_tokens for s in samples) / span, 3),
            "latency_ms": _percentiles(latencies),
            "ttft_ms": _percentiles(ttfts),
        }

    def snapshot(self) -> dict[str, Any]:
        """The body of `GET /v1/stats`."""
        samples = self._recent()
        views = [slot.view() for slot in self.registry.configured()]
        speculative = self.speculative_stats()
        tiers: dict[str, Any] = {}
        for v in views:
            mine = [s for s in samples if s.tier == v.tier]
            tiers[v.tier] = {
                "model": v.model,
                "state": v.state,
                "requests": self.tier_totals.get(v.tier, _Totals()).view(),
                "overflowed": v.overflowed,
                **self._rates(mine),
                "in_flight": v.in_flight,
                "queued": v.queued,
                "usage_count": v.requests,
                "memory_bytes": v.memory_bytes,
                "worker": v.worker,
                "speculative": speculative.get(v.tier),  # drafted / accepted tokens (None: not speculating)
            }
        return {
            "uptime_seconds": round(self.registry.uptime(), 3),
            "window_seconds": self.window,
            "requests": {
                **self.totals.view(),
                "active": self.active,
                "queued": sum(v.queued for v in views),
            },
            **self._rates(samples),
            "tiers": tiers,
            "workers": [{"tier": v.tier, **v.worker} for v in views if v.worker is not None],
            "memory": {
                "process_rss_bytes": process_rss(),
                "models_bytes": sum(v.memory_bytes for v in views),
                "note": "models_bytes is the loaded models' size on disk (weights are memory-mapped)",
            },
        }

    def prompt_cache_stats(self) -> dict[str, dict[str, Any]]:
        """Per loaded generation tier with a prompt cache: its tiers' counts (`Backend.prompt_cache_stats`)."""
        return {
            name: found for name, backend in self._backends() if (found := backend.prompt_cache_stats()) is not None
        }

    def speculative_stats(self) -> dict[str, dict[str, int]]:
        """Per loaded generation tier that speculates: drafted and accepted tokens (`Backend.speculative_stats`)."""
        return {name: found for name, backend in self._backends() if (found := backend.speculative_stats()) is not None}

    def _backends(self) -> Iterator[tuple[str, Backend]]:
        for slot in self.registry.configured():
            if slot.state is TierState.LOADED and isinstance(slot.engine, Backend):
                yield slot.name, slot.engine

    def prefix_stats(self) -> dict[str, Any]:
        total = PrefixCounts()
        for p in self.prefix.values():
            total.requests += p.requests
            total.hits += p.hits
            total.prompt_tokens += p.prompt_tokens
            total.reused_tokens += p.reused_tokens
        loaded = [s for s in self.registry.configured() if s.state is TierState.LOADED and s.worker]
        return {
            "hits": total.hits,
            "misses": total.requests - total.hits,
            "hit_rate": round(total.hits / total.requests, 4) if total.requests else 0.0,
            "entries": len(loaded),  # one KV cache per loaded generation model
            "bytes": None,  # engines do not report their KV cache size
            "prompt_tokens": total.prompt_tokens,
            "reused_tokens": total.reused_tokens,
            "token_hit_rate": round(total.reused_tokens / total.prompt_tokens, 4) if total.prompt_tokens else 0.0,
            "by_tier": {
                tier: {"hits": p.hits, "misses": p.requests - p.hits, "reused_tokens": p.reused_tokens}
                for tier, p in sorted(self.prefix.items())
            },
        }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "count": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:  # nearest rank
        return round(ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))] * 1000, 3)

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "count": len(ordered)}


def process_rss() -> int | None:
    """Resident memory of this process now (Linux), else its peak (macOS reports bytes)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class _LiveCollector:
    """Gauges and counters read from the registry and the cache at scrape time."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.t = telemetry

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        t = self.t
        yield GaugeMetricFamily("llmservice_uptime_seconds", "Seconds since start", t.registry.uptime())
        yield GaugeMetricFamily("llmservice_requests_active", "HTTP requests in progress", t.active)
        queue = GaugeMetricFamily(
            "llmservice_queue_depth", "Requests (generation) or inputs waiting for a tier's model", labels=["tier"]
        )
        busy = GaugeMetricFamily("llmservice_worker_busy", "1 while a tier's model runs", labels=["tier"])
        overflowed = CounterMetricFamily(
            "llmservice_overflowed", "Requests a full queue passed on to the tier's OVERFLOW tier", labels=["tier"]
        )
        processed = CounterMetricFamily(
            "llmservice_worker_processed", "Jobs (generation) or batches (embedding, rerank) finished", labels=["tier"]
        )
        state = GaugeMetricFamily("llmservice_model_state", "1 for each tier's current state", labels=["tier", "state"])
        load = GaugeMetricFamily("llmservice_model_load_seconds", "Duration of the last model load", labels=["tier"])
        size = GaugeMetricFamily("llmservice_model_size_bytes", "Size on disk of loaded models", labels=["tier"])
        up = GaugeMetricFamily(
            "llmservice_upstream_healthy", "1 while a remote tier's upstream is in the pool", labels=["tier", "url"]
        )
        upstream_load = GaugeMetricFamily(
            "llmservice_upstream_in_flight", "Requests running on a remote tier's upstream", labels=["tier", "url"]
        )
        upstream_errors = CounterMetricFamily(
            "llmservice_upstream_errors", "Failed requests and health checks per upstream", labels=["tier", "url"]
        )
        for v in (slot.view() for slot in t.registry.configured()):
            state.add_metric([v.tier, v.state], 1)
            for u in (v.worker or {}).get("upstreams", ()):
                up.add_metric([v.tier, u["url"]], 1 if u["state"] == "healthy" else 0)
                upstream_load.add_metric([v.tier, u["url"]], u["in_flight"])
                upstream_errors.add_metric([v.tier, u["url"]], u["errors"])
            queue.add_metric([v.tier], v.queued)
            if v.overflowed:
                overflowed.add_metric([v.tier], v.overflowed)
            if v.worker is not None:
                busy.add_metric([v.tier], 1 if v.busy else 0)
                processed.add_metric([v.tier], v.processed)
            if v.load_seconds is not None:
                load.add_metric([v.tier], v.load_seconds)
            if v.memory_bytes:
                size.add_metric([v.tier], v.memory_bytes)
        yield from (queue, busy, processed, overflowed, state, load, size, up, upstream_load, upstream_errors)

        hits = CounterMetricFamily("llmservice_cache_hits", "Cache hits", labels=["cache", "kind"])
        misses = CounterMetricFamily("llmservice_cache_misses", "Cache misses", labels=["cache", "kind"])
        for kind, counts in t.cache.counts.items():
            hits.add_metric(["response", kind], counts.hits)
            misses.add_metric(["response", kind], counts.misses)
        for tier, prefix in t.prefix.items():
            hits.add_metric(["prefix", tier], prefix.hits)
            misses.add_metric(["prefix", tier], prefix.requests - prefix.hits)
        prompt = t.prompt_cache_stats()
        for tier, tier_stats in prompt.items():
            for kind in ("ram", "disk"):
                hits.add_metric([f"prompt_{kind}", tier], tier_stats[kind]["hits"])
            misses.add_metric(["prompt", tier], tier_stats["misses"])
        yield hits
        yield misses
        budget = t.registry.budget
        if budget.total is not None:
            yield GaugeMetricFamily("llmservice_memory_budget_bytes", "MEMORY_BUDGET models load within", budget.total)
        held = GaugeMetricFamily("llmservice_memory_held_bytes", "Memory budget held by each model", labels=["tier"])
        for name, held_bytes in budget.holdings().items():
            held.add_metric([name], held_bytes)
        yield held
        labels = ["tier", "kind"]
        entries = GaugeMetricFamily("llmservice_prompt_cache_entries", "Prompt cache entries per tier", labels=labels)
        held = GaugeMetricFamily("llmservice_prompt_cache_bytes", "Bytes held by the prompt cache", labels=labels)
        evicted = CounterMetricFamily(
            "llmservice_prompt_cache_evictions", "Prompt cache entries evicted by its budget", labels=labels
        )
        for tier, tier_stats in prompt.items():
            for kind in ("ram", "disk"):
                entries.add_metric([tier, kind], tier_stats[kind]["entries"])
                held.add_metric([tier, kind], tier_stats[kind]["bytes"])
                evicted.add_metric([tier, kind], tier_stats[kind]["evictions"])
        yield from (entries, held, evicted)
        drafted = CounterMetricFamily(
            "llmservice_speculative_drafted_tokens", "Draft tokens verified by speculative decoding", labels=["tier"]
        )
        accepted = CounterMetricFamily(
            "llmservice_speculative_accepted_tokens", "Draft tokens speculative decoding kept", labels=["tier"]
        )
        fallbacks = CounterMetricFamily(
            "llmservice_speculative_fallbacks", "Sequences decoded plainly on a speculating tier", labels=["tier"]
        )
        for tier, spec in t.speculative_stats().items():
            drafted.add_metric([tier], spec["drafted"])
            accepted.add_metric([tier], spec["accepted"])
            fallbacks.add_metric([tier], spec.get("fallbacks", 0))
        yield from (drafted, accepted, fallbacks)
        stats = t.cache.stats()
        yield GaugeMetricFamily("llmservice_response_cache_entries", "Entries in the response cache", stats["entries"])
        yield GaugeMetricFamily("llmservice_response_cache_bytes", "Bytes held by the response cache", stats["bytes"])


class TelemetryMiddleware:
    """Times every routed request and adds the per-request response headers."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        handler = scope.get("route_handler")
        observed = bool(handler.opt.get("observe", True)) if handler is not None else True
        route = str(scope.get("path_template") or scope["path"])
        record = self.telemetry.begin(route, scope["method"], observed)
        scope["state"][RECORD] = record
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Appended as they are: only this middleware sets these names (Litestar's header
                # object looks each name up first, ~8 us a response).
                headers = [*message.get("headers", ()), _process_time(record)]
                if record.cache is not None:
                    headers.append((b"x-cache", record.cache.upper().encode()))
                if record.tier is not None:  # which tier answered: OVERFLOW may pass a request on
                    headers.append((b"x-llmservice-tier", record.tier.encode()))
                if (rl := record.rate_limit) is not None:
                    headers.append((b"x-ratelimit-limit", b"%d" % rl.limit))
                    headers.append((b"x-ratelimit-remaining", b"%d" % rl.remaining))
                    headers.append((b"x-ratelimit-reset", b"%d" % rl.reset))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self.telemetry.finish(record, status)


def _process_time(record: RequestRecord) -> tuple[bytes, bytes]:
    return b"x-process-time", b"%.3f" % ((time.monotonic() - record.started) * 1000)


def request_record(scope: Scope) -> RequestRecord:
    record = scope["state"].get(RECORD)
    return record if isinstance(record, RequestRecord) else RequestRecord(str(scope["path"]), "")
