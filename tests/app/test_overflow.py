"""`<TIER>_OVERFLOW`: what a tier's full queue would refuse goes to another tier, one hop only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from service.settings import SettingsError, parse_settings
from service.testing import counting, fake_engines
from tests.live import LiveServer, error_of, live_server
from tests.upstreams import free_port

# One running and one waiting request fill a tier; light passes the rest on to medium, medium to
# heavy: a remote tier whose one upstream never answers (nothing listens on its port).
ENV = {
    "LIGHT_MODEL_PATH": "fake/light",
    "MEDIUM_MODEL_PATH": "fake/medium",
    "LIGHT_OVERFLOW": "medium",
    "MEDIUM_OVERFLOW": "heavy",
    "HEAVY_BACKEND": "remote",
    "HEAVY_REMOTE_URLS": f"http://127.0.0.1:{free_port()}/v1",
    "HEAVY_REMOTE_COOLDOWN": "3600",
    **{f"{tier}_{key}": "1" for tier in ("LIGHT", "MEDIUM") for key in ("MAX_BATCH", "MAX_QUEUE")},
}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    engines = fake_engines(reply=counting, token_seconds=0.02)  # ~20 s an answer: they hold their tier
    with live_server(ENV, wait_for=("light", "medium", "heavy"), engines=engines) as live:
        yield live


def _chat(**extra: object) -> dict[str, object]:
    return {"model": "light", "messages": [{"role": "user", "content": "count"}], **extra}


async def _queued(http: httpx.AsyncClient, tier: str, running: int, queued: int) -> None:
    """Until /v1/stats shows the tier with that many requests running and waiting."""
    while True:
        stats = (await http.get("/v1/stats")).json()["tiers"][tier]
        if (stats["in_flight"] - stats["queued"], stats["queued"]) == (running, queued):
            return
        await asyncio.sleep(0.02)


async def _holding(http: httpx.AsyncClient, release: asyncio.Event, tiers: list[str]) -> None:
    """A long streamed answer, held open (its tier busy) until `release`; notes the tier that took it."""
    async with http.stream("POST", "/v1/chat/completions", json=_chat(stream=True)) as res:
        assert res.status_code == 200
        tiers.append(res.headers["x-llmservice-tier"])
        lines: AsyncIterator[str] = res.aiter_lines()
        await anext(lines)
        await release.wait()


async def _fill(
    http: httpx.AsyncClient, tier: str, release: asyncio.Event, tiers: list[str]
) -> list[asyncio.Task[None]]:
    """Two held answers that `tier` takes: one running, then one waiting (its queue is then full)."""
    held = [asyncio.create_task(_holding(http, release, tiers))]
    await _queued(http, tier, 1, 0)
    held.append(asyncio.create_task(_holding(http, release, tiers)))
    await _queued(http, tier, 1, 1)
    return held


def test_a_full_queue_passes_requests_to_the_overflow_tier(server: LiveServer) -> None:
    async def scenario() -> None:
        release, tiers = asyncio.Event(), list[str]()
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            held = await _fill(http, "light", release, tiers)

            res = await http.post("/v1/chat/completions", json=_chat(max_tokens=3))
            assert res.status_code == 200, res.text
            assert res.headers["x-llmservice-tier"] == "medium"
            assert res.json()["choices"][0]["message"]["content"].startswith("4,5")
            assert res.json()["model"] == "light"  # the name the client asked for

            held += await _fill(http, "medium", release, tiers)  # streamed to light, which passes them on
            # Both full: a 429 from light, never a second hop.
            error = error_of(await http.post("/v1/chat/completions", json=_chat(max_tokens=3)), 429)
            assert error["code"] == "queue_full"

            stats = (await http.get("/v1/stats")).json()["tiers"]
            assert (stats["light"]["overflowed"], stats["medium"]["overflowed"]) == (3, 0)
            assert 'llmservice_overflowed_total{tier="light"} 3.0' in (await http.get("/metrics")).text
            release.set()
            await asyncio.gather(*held)
            assert sorted(tiers) == ["light", "light", "medium", "medium"]

    asyncio.run(scenario())


def test_messages_and_responses_overflow_too(server: LiveServer) -> None:
    async def scenario() -> None:
        release, tiers = asyncio.Event(), list[str]()
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            held = await _fill(http, "light", release, tiers)
            user = [{"role": "user", "content": "count"}]
            messages = await http.post("/v1/messages", json={"model": "light", "max_tokens": 3, "messages": user})
            responses = await http.post(
                "/v1/responses", json={"model": "light", "max_output_tokens": 3, "input": "count"}
            )
            for res in (messages, responses):
                assert res.status_code == 200, res.text
                assert res.headers["x-llmservice-tier"] == "medium"
                assert res.json()["model"] == "light"
            release.set()
            await asyncio.gather(*held)

    asyncio.run(scenario())


def test_a_remote_overflow_with_every_upstream_ejected_keeps_the_full_queues_429(server: LiveServer) -> None:
    async def scenario() -> None:
        release, tiers = asyncio.Event(), list[str]()
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            held = await _fill(http, "light", release, tiers)
            held += await _fill(http, "medium", release, tiers)  # through light, which passes them on
            for stream in (False, True):
                res = await http.post("/v1/chat/completions", json=_chat(model="medium", stream=stream, max_tokens=3))
                error = error_of(res, 429)  # the client may retry here soon, not a 503 from a tier it never named
                assert error["code"] == "queue_full"
            assert (await http.get("/v1/stats")).json()["tiers"]["medium"]["overflowed"] == 0
            release.set()
            await asyncio.gather(*held)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("value", "why"),
    [("light", "another generation tier"), ("embedding", "another generation tier"), ("heavy", "not configured")],
)
def test_an_overflow_must_name_another_configured_generation_tier(value: str, why: str) -> None:
    with pytest.raises(SettingsError, match=f"LIGHT_OVERFLOW='{value}': .*{why}"):
        parse_settings({"LIGHT_MODEL_PATH": "fake/light", "MEDIUM_MODEL_PATH": "fake/m", "LIGHT_OVERFLOW": value})


def test_only_generation_tiers_overflow() -> None:
    with pytest.raises(SettingsError, match="EMBEDDING_OVERFLOW does not apply"):
        parse_settings({"EMBEDDING_MODEL_PATH": "fake/e", "EMBEDDING_OVERFLOW": "light"})
