"""A stream waiting for its next chunk when shutdown is due ends with a 503 and cancels its job;
a cancellation that is not the drain's (the client left) still propagates."""

from __future__ import annotations

import asyncio

import pytest

from backends.base import Chunk, GenerationRequest
from service.serving import streaming
from service.serving.drain import Drain
from service.tiers.workers import Job, JobStream


def _stream() -> tuple[Job, JobStream]:
    job = Job(GenerationRequest(), asyncio.get_running_loop())
    return job, JobStream(job, lambda _: None)


async def _events(drain: Drain, stream: JobStream) -> list[bytes]:
    events = streaming.event_stream(
        stream, Chunk(text="a"), opening=[], piece=lambda c: [c.text], usage_event=None, drain=drain
    )
    return [event async for event in events]


def test_a_wait_in_progress_ends_with_a_503_once_the_drain_is_due(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "_DRAIN_POLL", 0.01)

    async def run() -> None:
        drain = Drain()
        job, stream = _stream()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, job.put, Chunk(text="b"))
        loop.call_later(0.1, drain.begin, 0.0)  # due at once; no chunk comes after "b"
        events = await asyncio.wait_for(_events(drain, stream), 5)
        assert events[:2] == [b'data: "a"\n\n', b'data: "b"\n\n']
        assert b"server_shutting_down" in events[2] and events[3] == b"data: [DONE]\n\n"
        assert job.cancelled.is_set()
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    asyncio.run(run())


def test_a_cancellation_that_is_not_the_drains_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "_DRAIN_POLL", 0.01)

    async def run() -> None:
        job, stream = _stream()
        task = asyncio.ensure_future(_events(Drain(), stream))
        await asyncio.sleep(0.05)  # the drain's timer has polled a few times meanwhile
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert job.cancelled.is_set()

    asyncio.run(run())


def test_chunks_flow_and_the_timer_stops_at_the_end() -> None:
    async def run() -> None:
        job, stream = _stream()
        loop = asyncio.get_running_loop()
        for text in "bc":
            loop.call_soon(job.put, Chunk(text=text))
        loop.call_soon(job.put, None)
        events = await _events(Drain(), stream)
        assert events == [b'data: "a"\n\n', b'data: "b"\n\n', b'data: "c"\n\n', b"data: [DONE]\n\n"]
        assert not [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]

    asyncio.run(run())


def test_shutdown_due_before_the_wait_ends_the_stream_at_once() -> None:
    async def run() -> None:
        drain = Drain()
        drain.begin(0.0)
        job, stream = _stream()
        events = await asyncio.wait_for(_events(drain, stream), 5)
        assert b"server_shutting_down" in events[1]
        assert job.cancelled.is_set()

    asyncio.run(run())
