"""MicroBatcher with plain functions: coalescing, bounds, ordering, isolation, cancellation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from kernel.errors import EngineError, ModelUnavailableError, RateLimitError
from service.tiers.micro_batcher import MicroBatcher

X = TypeVar("X")


def run(coro: Coroutine[Any, Any, X]) -> X:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


class Recorder:
    """run_batch that doubles numbers and remembers every batch and the thread it ran on."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.gate = gate
        self.started = threading.Event()  # a batch reached the worker (and waits at the gate)

    def __call__(self, items: list[int]) -> list[int]:
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.threads.add(threading.get_ident())
        self.batches.append(list(items))
        if any(i < 0 for i in items):
            raise ValueError("negative input")
        return [2 * i for i in items]


async def _until(predicate: Callable[[], bool]) -> None:
    # Polls the batcher's internal state, which exposes no event to wait on.
    while not predicate():  # noqa: ASYNC110
        await asyncio.sleep(0.001)


def test_concurrent_submissions_are_coalesced_and_split_back_in_order() -> None:
    rec = Recorder()

    async def main() -> list[list[int]]:
        batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=64, max_wait_ms=50)
        inputs = [[10 * s + k for k in range(1 + s % 3)] for s in range(10)]
        results = await asyncio.gather(*(batcher.submit(i) for i in inputs))
        await batcher.close()
        assert results == [[2 * x for x in i] for i in inputs]
        return rec.batches

    batches = run(main())
    assert len(batches) < 10  # coalesced: fewer model calls than requests
    assert sum(len(b) for b in batches) == sum(1 + s % 3 for s in range(10))


def test_batches_never_exceed_max_size_and_large_submissions_are_split() -> None:
    rec = Recorder()

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=8, max_wait_ms=5)
        big = list(range(100))
        small = [1000, 1001]
        out_big, out_small = await asyncio.gather(batcher.submit(big), batcher.submit(small))
        assert out_big == [2 * x for x in big]
        assert out_small == [2000, 2002]
        await batcher.close()

    run(main())
    assert all(1 <= len(b) <= 8 for b in rec.batches)
    assert len(rec.batches) >= 13  # 102 items / 8


def test_all_batches_run_in_one_worker_thread() -> None:
    rec = Recorder()

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=2, max_wait_ms=1)
        await asyncio.gather(*(batcher.submit([i, i + 1, i + 2]) for i in range(8)))
        await batcher.close()

    run(main())
    assert len(rec.threads) == 1
    assert threading.get_ident() not in rec.threads


def test_a_failing_submission_does_not_fail_its_neighbours() -> None:
    rec = Recorder()

    async def main() -> list[Any]:
        batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=32, max_wait_ms=50)
        results = await asyncio.gather(
            batcher.submit([1, 2]), batcher.submit([-1]), batcher.submit([3]), return_exceptions=True
        )
        await batcher.close()
        return list(results)

    good1, bad, good2 = run(main())
    assert good1 == [2, 4]
    assert good2 == [6]
    assert isinstance(bad, ValueError)
    assert [1, 2, -1, 3] in rec.batches  # tried together first, then each alone
    assert [1, 2] in rec.batches and [3] in rec.batches


def test_wrong_number_of_results_is_an_engine_error() -> None:
    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: items[:-1], max_wait_ms=0)
        with pytest.raises(EngineError):
            await batcher.submit([1, 2])
        await batcher.close()

    run(main())


def test_full_queue_raises_rate_limit_with_retry_after() -> None:
    gate = threading.Event()
    rec = Recorder(gate)

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=4, max_wait_ms=0, max_queued_items=6)
        first = asyncio.ensure_future(batcher.submit([1, 2, 3, 4]))  # occupies the worker
        await _until(lambda: batcher.queued_items == 0 and first is not None)
        await asyncio.sleep(0.01)
        waiting = [asyncio.ensure_future(batcher.submit([5, 6, 7])), asyncio.ensure_future(batcher.submit([8, 9]))]
        await _until(lambda: batcher.queued_items == 5)
        with pytest.raises(RateLimitError) as info:
            await batcher.submit([10, 11])
        assert info.value.retry_after == 1
        assert info.value.status == 429
        gate.set()
        assert await first == [2, 4, 6, 8]
        assert await asyncio.gather(*waiting) == [[10, 12, 14], [16, 18]]
        # A submission larger than the whole queue bound is admitted when nothing else waits.
        assert len(await batcher.submit(list(range(20)))) == 20
        await batcher.close()

    run(main())


def test_cancelled_submitter_items_never_reach_the_model() -> None:
    gate = threading.Event()
    rec = Recorder(gate)

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=4, max_wait_ms=0)
        first = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.02)  # the first batch is now blocked in the worker
        doomed = asyncio.ensure_future(batcher.submit([77, 78]))
        kept = asyncio.ensure_future(batcher.submit([5]))
        await _until(lambda: batcher.queued_items == 3)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert batcher.queued_items == 1
        gate.set()
        assert await first == [2]
        assert await kept == [10]
        await batcher.close()

    run(main())
    assert all(77 not in b and 78 not in b for b in rec.batches)


def test_a_full_batch_does_not_wait_for_the_window() -> None:
    rec = Recorder()

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=3, max_wait_ms=60_000)
        # Would hang for a minute (and trip the timeout) if a full batch still waited.
        assert await asyncio.wait_for(batcher.submit([1, 2, 3]), timeout=10) == [2, 4, 6]
        await batcher.close()

    run(main())


def test_close_fails_waiting_submissions_and_refuses_new_ones() -> None:
    gate = threading.Event()
    rec = Recorder(gate)

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=1, max_wait_ms=0)
        running = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.02)
        waiting = asyncio.ensure_future(batcher.submit([2]))
        await _until(lambda: batcher.queued_items == 1)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        with pytest.raises(ModelUnavailableError):
            await waiting
        gate.set()
        await closing
        assert await running == [2]  # the batch already running finishes
        with pytest.raises(ModelUnavailableError):
            await batcher.submit([3])

    run(main())


def test_empty_submission_returns_empty_without_a_batch() -> None:
    rec = Recorder()

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(rec)
        assert await batcher.submit([]) == []
        await batcher.close()

    run(main())
    assert rec.batches == []


def test_token_budget_packs_by_length_across_requests() -> None:
    # Items are their own token counts. Two requests with interleaved lengths: packed, each batch
    # holds rows of similar length and its padded size (rows x longest) stays within the budget.
    gate = threading.Event()
    rec = Recorder(gate)

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            rec, max_batch_size=64, max_batch_tokens=30, cost=lambda n: n, max_wait_ms=0
        )
        first = asyncio.ensure_future(batcher.submit([1]))
        await _until(rec.started.is_set)
        a = [10, 2, 10, 2, 3]
        b = [2, 10, 3, 2]
        futures = [asyncio.ensure_future(batcher.submit(x)) for x in (a, b)]
        await _until(lambda: batcher.queued_items == len(a) + len(b))
        gate.set()
        assert await first == [2]
        assert await futures[0] == [2 * x for x in a]  # each request's own order
        assert await futures[1] == [2 * x for x in b]
        await batcher.close()

    run(main())
    packed = rec.batches[1:]
    assert all(len(b) * max(b) <= 30 for b in packed)
    assert sorted(packed[0]) == [10, 10, 10]  # the long rows together, from both requests
    assert sorted(x for b in packed[1:] for x in b) == [2, 2, 2, 2, 3, 3]
    assert len(packed) == 2  # the six short ones fit one batch: 6 x 3 <= 30
    # Unpacked (request order, 8 rows a batch) this would pad every row to 10: 90 tokens.
    assert sum(len(b) * max(b) for b in packed) == 3 * 10 + 6 * 3


def test_an_item_over_the_budget_runs_alone() -> None:
    rec = Recorder()

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            rec, max_batch_size=8, max_batch_tokens=16, cost=lambda n: n, max_wait_ms=0
        )
        assert await batcher.submit([100, 1, 1]) == [200, 2, 2]
        await batcher.close()

    run(main())
    assert rec.batches == [[100], [1, 1]]


def test_a_huge_request_does_not_starve_a_small_one() -> None:
    # The huge request queues first; the small one arrives behind it, yet finishes after at most
    # two batches (its turn comes next) instead of after all of the huge request's batches.
    gate = threading.Event()
    rec = Recorder(gate)

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            rec, max_batch_size=4, max_batch_tokens=400, cost=lambda n: n, max_wait_ms=0, max_queued_items=10_000
        )
        first = asyncio.ensure_future(batcher.submit([1]))
        await _until(rec.started.is_set)
        huge = asyncio.ensure_future(batcher.submit([50] * 400))
        await _until(lambda: batcher.queued_items == 400)
        small = asyncio.ensure_future(batcher.submit([7, 8]))
        await _until(lambda: batcher.queued_items == 402)
        gate.set()
        assert await first == [2]
        assert await small == [14, 16]
        assert await huge == [100] * 400
        await batcher.close()

    run(main())
    # The first batch, one of the huge request's, then the small one's (not after all 100).
    assert rec.batches[2] == [8, 7]
    assert len(rec.batches) == 2 + 100


def test_requests_take_turns_anchoring_batches() -> None:
    # Three requests of equal length and more items than a batch: batches rotate between them.
    gate = threading.Event()
    rec = Recorder(gate)

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=2, max_wait_ms=0)
        first = asyncio.ensure_future(batcher.submit([0]))
        await _until(rec.started.is_set)
        subs = [asyncio.ensure_future(batcher.submit([100 * s + k for k in range(4)])) for s in (1, 2, 3)]
        await _until(lambda: batcher.queued_items == 12)
        gate.set()
        await first
        for s, fut in zip((1, 2, 3), subs, strict=True):
            assert await fut == [2 * (100 * s + k) for k in range(4)]
        await batcher.close()

    run(main())
    owners = [b[0] // 100 for b in rec.batches[1:]]
    assert owners == [1, 2, 3, 1, 2, 3]


def test_cancelling_a_request_mid_way_drops_only_its_waiting_items() -> None:
    permits = threading.Semaphore(0)  # one per batch the model may run: the test sets the pace

    class Paced(Recorder):
        def __call__(self, items: list[int]) -> list[int]:
            self.started.set()
            assert permits.acquire(timeout=10)
            return super().__call__(items)

    rec = Paced()

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            rec, max_batch_size=2, max_batch_tokens=1000, cost=lambda n: n % 100 + 1, max_wait_ms=0
        )
        first = asyncio.ensure_future(batcher.submit([0]))
        await _until(rec.started.is_set)
        doomed = asyncio.ensure_future(batcher.submit([500 + k for k in range(6)]))
        kept = asyncio.ensure_future(batcher.submit([7, 9, 8]))
        await _until(lambda: batcher.queued_items == 9)
        permits.release(2)  # the first request's batch, then one batch of the waiting ones
        await first
        await _until(lambda: batcher.batches >= 2)  # the doomed request has had one batch
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        permits.release(10)
        assert await kept == [14, 18, 16]
        await batcher.close()

    run(main())
    seen = [x for b in rec.batches for x in b if x >= 500]
    assert 0 < len(seen) < 6  # part ran before the cancel, the rest never reached the model
