"""Micro-batching: coalesce concurrent requests into one model call on one worker thread.

Embedding and reranking models are far faster on a batch of 32 texts than on 32 single texts,
and they are not thread-safe. `MicroBatcher` queues the items of every `submit()`, waits at most
`max_wait_ms` after the oldest one arrived (less once a batch's worth is waiting), then runs
`run_batch` on one batch in its single worker thread and hands each submitter its own results,
in its own order.

Packing (token budget): with a `cost` (an item's tokens), a batch is built around an *anchor*,
the longest waiting item of the submission whose turn it is, and filled with the longest
waiting items of every submission that are no longer than the anchor. The model pads every row to
the longest, so rows of similar length waste little, and the padded size, rows x anchor tokens,
stays within `max_batch_tokens` (and rows within `max_batch_size`; an item alone may exceed the
budget). Without a cost every item counts 1 and batches fill in arrival order.

Fairness: the anchor's submission then moves to the back of the queue, so with n submissions
waiting each one anchors at least one batch in every n: a huge request shares the model with small
ones instead of holding it until it is done.

Failure isolation: if `run_batch` raises for a batch that mixes several submissions, each one's
part is retried alone, so one request's bad input fails only that request.

Priority: `submit(..., background=True)` (batch-job lines) queues apart; a batch takes background
items only when no interactive item waits, and background items do not count against
`max_queued_items` (their runner bounds them), so a big batch job never makes an interactive
request wait behind it or see 429.

Back-pressure: more than `max_queued_items` waiting items raises `RateLimitError` (429,
Retry-After 1); a single submission larger than that is still admitted when nothing else waits.

Everything but `run_batch` runs on the event loop thread, so the queue needs no lock.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kernel.errors import EngineError, ModelUnavailableError, RateLimitError
from service.tiers.executor import busy_fraction

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class _Submission(Generic[T, R]):
    items: list[T]
    costs: list[int]
    future: asyncio.Future[list[R]]
    enqueued: float
    results: list[R | None] = field(default_factory=list)
    # Undispatched item indices, longest first (ties in request order); `keys` mirrors it as
    # ascending (-cost, index) for bisect.
    pending: list[int] = field(default_factory=list)
    keys: list[tuple[int, int]] = field(default_factory=list)
    delivered: int = 0
    background: bool = False

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)
        self.keys = sorted((-c, i) for i, c in enumerate(self.costs))
        self.pending = [i for _, i in self.keys]

    def fitting(self, width: int) -> int:
        """Index in `pending` of the first (longest) item no longer than `width`."""
        return bisect.bisect_left(self.keys, (-width, -1))


@dataclass(eq=False)
class _Piece(Generic[T, R]):
    """The items of one submission in one batch."""

    sub: _Submission[T, R]
    indices: list[int]

    @property
    def items(self) -> list[T]:
        return [self.sub.items[i] for i in self.indices]


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], list[R]],
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int | None = None,
        cost: Callable[[T], int] | None = None,
        max_wait_ms: float = 5.0,
        max_queued_items: int = 1024,
        name: str = "batcher",
        executor: Executor | None = None,
    ) -> None:
        """`cost`: an item's tokens (>= 1), for packing by length and `max_batch_tokens`.
        `executor`: run batches there instead of a private one-thread pool (it must run one job
        at a time for models that are not thread-safe); the caller then owns its shutdown."""
        if max_batch_size < 1 or max_queued_items < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queued_items must be >= 1, max_wait_ms >= 0")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be >= 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.cost = cost
        self.max_wait = max_wait_ms / 1000.0
        self.max_queued_items = max_queued_items
        self.name = name
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._queue: deque[_Submission[T, R]] = deque()
        self._background: deque[_Submission[T, R]] = deque()  # served when `_queue` is empty
        self._queued = 0  # items waiting in both queues
        self._queued_background = 0
        self._queued_cost = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._contended = False  # the last batch shared the model, or others queued behind it
        self.batches = 0  # run_batch calls that succeeded, for metrics and tests
        self.items = 0
        self.padded_tokens = 0  # rows x longest row over all batches: what packing keeps small
        self.started = time.monotonic()
        self.busy_since: float | None = None  # while a batch runs
        self.busy_seconds = 0.0

    @property
    def queued_items(self) -> int:
        """Items waiting for a batch (not counting the batch running now)."""
        return self._queued

    # -- the Executor protocol (service.tiers.slots); its units are items, not requests ----------------
    @property
    def in_flight(self) -> int:
        return self._queued

    @property
    def waiting(self) -> int:
        return self._queued

    @property
    def interactive_waiting(self) -> int:
        return self._queued - self._queued_background

    @property
    def busy(self) -> bool:
        return self.busy_since is not None

    @property
    def processed(self) -> int:
        return self.batches

    def set_queue_limit(self, limit: int) -> None:
        self.max_queued_items = limit

    async def retire(self) -> bool:
        await self.close(drain=True)
        return True  # `close` waited for the running batch

    async def stop(self) -> bool:
        await self.close()
        return True

    def view(self) -> dict[str, Any]:
        busy, share = busy_fraction(self.busy_seconds, self.busy_since, self.started)
        return {
            "state": "batching",
            "batches": self.batches,
            "items": self.items,
            "queued": self._queued,
            "busy_seconds": round(busy, 3),
            "utilisation": round(share, 4),
        }

    async def submit(self, items: Sequence[T], *, background: bool = False) -> list[R]:
        """Results for `items`, in order, computed together with other concurrent submissions."""
        if self._closed:
            raise ModelUnavailableError(f"{self.name} is shutting down")
        batch = list(items)
        if not batch:
            return []
        waiting = self.interactive_waiting
        if not background and waiting and waiting + len(batch) > self.max_queued_items:
            raise RateLimitError(
                f"{self.name} has {waiting} items waiting (limit {self.max_queued_items}); retry shortly",
                retry_after=1,
                code="queue_full",
            )
        costs = [max(1, self.cost(item)) for item in batch] if self.cost is not None else [1] * len(batch)
        loop = asyncio.get_running_loop()
        wakeup = self._bind(loop)
        sub: _Submission[T, R] = _Submission(batch, costs, loop.create_future(), loop.time(), background=background)
        (self._background if background else self._queue).append(sub)
        self._count(sub, len(batch), sum(costs))
        wakeup.set()
        try:
            return await sub.future
        except asyncio.CancelledError:
            self._withdraw(sub)
            raise

    async def close(self, *, drain: bool = False) -> None:
        """Refuse new work and let the running batch finish; what still waits runs too with
        `drain` (an unload), else it fails with 503 (shutdown)."""
        self._closed = True
        while (waiting := self._queue or self._background) and not drain:
            self._fail(waiting[0], ModelUnavailableError(f"{self.name} is shutting down"))
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if self._own_executor:
            self._executor.shutdown(wait=False)

    # -- event loop side -------------------------------------------------------------------------

    def _bind(self, loop: asyncio.AbstractEventLoop) -> asyncio.Event:
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed() and self._task and not self._task.done():
                raise RuntimeError(f"{self.name} is already serving another event loop")
            self._loop, self._wakeup, self._task = loop, asyncio.Event(), None
            self._queue.clear()
            self._background.clear()
            self._queued = self._queued_background = self._queued_cost = 0
        assert self._wakeup is not None
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._dispatch(), name=f"{self.name}-dispatcher")
        return self._wakeup

    def _withdraw(self, sub: _Submission[T, R]) -> None:
        """A submitter was cancelled: drop its undispatched items; a running piece is discarded."""
        queue = self._background if sub.background else self._queue
        if sub in queue:
            queue.remove(sub)
            self._count(sub, -len(sub.pending), -sum(sub.costs[i] for i in sub.pending))
            sub.pending, sub.keys = [], []

    def _count(self, sub: _Submission[T, R], items: int, cost: int) -> None:
        self._queued += items
        self._queued_cost += cost
        if sub.background:
            self._queued_background += items

    def _fail(self, sub: _Submission[T, R], exc: BaseException) -> None:
        self._withdraw(sub)
        if not sub.future.done():
            sub.future.set_exception(exc)

    def _deliver(self, piece: _Piece[T, R], results: list[R]) -> None:
        sub = piece.sub
        if sub.future.done():  # cancelled or already failed
            return
        for i, result in zip(piece.indices, results, strict=True):
            sub.results[i] = result
        sub.delivered += len(results)
        if sub.delivered == len(sub.items):
            sub.future.set_result(sub.results)  # type: ignore[arg-type]  # every slot is filled

    def _full(self) -> bool:
        """A batch's worth is waiting: no reason to wait for more company."""
        if self._queued >= self.max_batch_size:
            return True
        return self.max_batch_tokens is not None and self._queued_cost >= self.max_batch_tokens

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        wakeup = self._wakeup
        assert wakeup is not None
        try:
            while True:
                while not (self._queue or self._background):
                    if self._closed:
                        return
                    wakeup.clear()
                    await wakeup.wait()
                # Coalescing window, counted from the oldest waiting submission: requests that
                # queued while the previous batch ran do not wait again. Serial traffic (the last
                # batch was one request and nothing arrived meanwhile) skips it: nobody is coming.
                deadline = min(sub.enqueued for sub in self._queue or self._background) + self.max_wait
                serial = not self._contended and len(self._queue) + len(self._background) == 1
                while not self._full() and not self._closed and not serial:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    wakeup.clear()
                    try:
                        await asyncio.wait_for(wakeup.wait(), remaining)
                    except TimeoutError:
                        break
                if self._queue or self._background:
                    pieces = self._take()
                    await self._run(loop, pieces)
                    self._contended = len(pieces) > 1 or bool(self._queue or self._background)
        except BaseException as exc:  # a bug here must not leave submitters waiting forever
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("%s: dispatcher failed", self.name)
            while waiting := self._queue or self._background:
                self._fail(waiting[0], EngineError(f"{self.name} failed; see the server log"))
            raise

    def _take(self) -> list[_Piece[T, R]]:
        """One batch: the anchor (the longest item of the submission whose turn it is) and the
        longest items no longer than it from every submission, within the row and token limits.
        Interactive submissions only, while any waits; else the background ones."""
        background = not self._queue
        queue = self._background if background else self._queue
        anchor = queue[0]
        width = anchor.costs[anchor.pending[0]]
        rows = self.max_batch_size
        if self.max_batch_tokens is not None:
            rows = max(1, min(rows, self.max_batch_tokens // width))
        # Candidates longest first; equal lengths go to the anchor, then to older submissions.
        starts = {id(sub): sub.fitting(width) for sub in queue}

        def candidates(rank: int, sub: _Submission[T, R]) -> Iterator[tuple[int, int, int, _Submission[T, R]]]:
            for pos in range(starts[id(sub)], len(sub.pending)):
                yield -sub.costs[sub.pending[pos]], rank, pos, sub

        merged = heapq.merge(*(candidates(rank, sub) for rank, sub in enumerate(queue)))
        taken: dict[int, list[int]] = {}
        for _, _, pos, sub in (c for c, _ in zip(merged, range(rows), strict=False)):
            taken.setdefault(id(sub), []).append(pos)
        pieces: list[_Piece[T, R]] = []
        for sub in queue:
            positions = taken.get(id(sub))
            if not positions:
                continue
            # Each submission gives a run of its pending list (longest first), starting at `fitting`.
            first, last = positions[0], positions[-1] + 1
            indices = sub.pending[first:last]
            del sub.pending[first:last], sub.keys[first:last]
            pieces.append(_Piece(sub, indices))
            self._count(sub, -len(indices), -sum(sub.costs[i] for i in indices))
        queue.rotate(-1)  # the anchor goes to the back: the next batch is someone else's turn
        kept = deque(sub for sub in queue if sub.pending)
        if background:
            self._background = kept
        else:
            self._queue = kept
        self.padded_tokens += width * sum(len(p.indices) for p in pieces)
        return pieces

    async def _run(self, loop: asyncio.AbstractEventLoop, pieces: list[_Piece[T, R]]) -> None:
        batch = [item for piece in pieces for item in piece.items]
        try:
            results = await loop.run_in_executor(self._executor, self._call, batch)
        except Exception as exc:
            if len(pieces) == 1:
                self._fail(pieces[0].sub, exc)
                return
            log.info("%s: a batch of %d submissions failed (%r); retrying each alone", self.name, len(pieces), exc)
            for piece in pieces:
                if piece.sub.future.done():
                    continue
                try:
                    alone = await loop.run_in_executor(self._executor, self._call, piece.items)
                except Exception as piece_exc:
                    self._fail(piece.sub, piece_exc)
                else:
                    self._deliver(piece, alone)
            return
        start = 0
        for piece in pieces:
            stop = start + len(piece.indices)
            self._deliver(piece, results[start:stop])
            start = stop

    # -- worker thread side ------------------------------------------------------------------------

    def _call(self, batch: list[T]) -> list[R]:
        self.busy_since = time.monotonic()
        try:
            results = list(self.run_batch(batch))
        finally:
            self.busy_seconds += time.monotonic() - self.busy_since
            self.busy_since = None
        if len(results) != len(batch):
            raise EngineError(f"{self.name}: run_batch returned {len(results)} results for {len(batch)} items")
        self.batches += 1
        self.items += len(batch)
        return results
