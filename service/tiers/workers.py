"""One worker thread per loaded generation model.

llama.cpp and MLX models are not thread-safe (two threads on one `Llama` crash the process), so
each model gets exactly one thread that runs jobs in arrival order. The event loop talks to it
through a bounded job queue and an asyncio queue of chunks per job.

Priority: the queue serves interactive jobs before background ones (batch-job lines), first come
first served within each; a background job already generating is not pre-empted. Background jobs
do not count against MAX_QUEUE (their runner bounds them, BATCH_CONCURRENCY per tier), so a big
batch can never make an interactive request see 429. For an engine that can batch
(`Backend.max_batch_size > 1`: llama.cpp, MLX) the same thread runs a continuous batch instead:
queued jobs join between decode steps, and each leaves on its own when it ends or its client goes
away.

Admission: a request's prompt is rendered and tokenised (`Backend.prepare`) on a small thread pool
before it queues, never on the model's thread, so running streams do not stall while a long new
prompt is read; the model's thread only checks again that the request's adapter is still loaded.
Cancelling a job (its client went away: `JobStream.cancel`) takes it out of the queue's count at
once; the thread skips it when it comes up, or drops it from the batch after the current step.
Stopping (server shutdown) cancels every job with a 503; the engine is freed only once the thread
has ended (see `stop`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Protocol

from backends.base import Backend, Chunk, DecodeBatch, DecodeState, GenerationRequest
from kernel.errors import EngineError, LLMServiceError, ModelUnavailableError, RateLimitError
from service.tiers.executor import busy_fraction

log = logging.getLogger(__name__)

_Event = Chunk | LLMServiceError | None  # None ends the stream
_INTERACTIVE, _BACKGROUND, _STOP = 0, 1, 2  # queue ranks: lower is served first
# Prompts prepared at once: one long prompt does not hold up a short one behind it; more would only
# contend with the model's thread for the GIL (templates render in Python).
_PREPARE_THREADS = 2
STOP_SECONDS = 5.0  # how long shutdown waits for the thread to leave its step once every job is cancelled


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[_Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    call: Callable[[], None] | None = None  # run this on the model's thread instead of generating
    background: bool = False  # a batch-job line: served after every waiting interactive job
    state: DecodeState | None = None  # the prompt `Backend.prepare` made of the request, before it queued
    counted_out: bool = False  # no longer counted as waiting: taken by the thread, or withdrawn (under the lock)

    def put(self, event: _Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            self.cancelled.set()


class ChunkStream(Protocol):
    """What controllers consume: a worker's `JobStream`, or a replay from the response cache."""

    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    async def __anext__(self) -> Chunk: ...

    def cancel(self) -> None: ...


class JobStream:
    """The chunks of one job as an async iterator; leaving early cancels the generation."""

    def __init__(self, job: Job, withdraw: Callable[[Job], None]) -> None:
        self._job = job
        self._withdraw = withdraw  # the worker's: a queued job stops counting as waiting
        self._done = False

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._job.events.get()
        except BaseException:
            self.cancel()
            raise
        if event is None:
            self._done = True
            raise StopAsyncIteration
        if isinstance(event, LLMServiceError):
            self._done = True
            raise event
        return event

    def cancel(self) -> None:
        if not self._job.cancelled.is_set():
            self._job.cancelled.set()
            self._withdraw(self._job)


class GenerationWorker:
    def __init__(self, name: str, backend: Backend, max_queue: int) -> None:
        self.name = name
        self.backend = backend
        self.max_queue = max_queue
        self.processed = 0
        self.busy_since: float | None = None
        self.busy_seconds = 0.0
        self.started = time.monotonic()
        self.finished_at = time.time()  # wall clock of the last job's end, for idle unloading
        # (rank, arrival, job): FIFO within a rank; the stop marker ranks after every queued job.
        self._jobs: queue.PriorityQueue[tuple[int, int, Job | None]] = queue.PriorityQueue()
        self._arrivals = itertools.count()
        self._waiting = 0
        self._waiting_background = 0
        self._preparing = 0  # submitted jobs whose prompt is being prepared (counted in `_waiting` too)
        self._preparer = ThreadPoolExecutor(_PREPARE_THREADS, thread_name_prefix=f"llm-prepare-{name}")
        self._running = 0  # jobs generating right now (up to max_batch_size)
        self._lock = threading.Lock()
        self._live: set[Job] = set()  # submitted and not ended: what `stop` cancels
        self._stopping = False
        self._batch: DecodeBatch | None = None
        self._active: dict[int, tuple[Job, DecodeState]] = {}  # the batch's jobs, by sequence key
        target = self._run_batched if backend.max_batch_size > 1 else self._run
        self._thread = threading.Thread(target=target, name=f"llm-worker-{name}", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def interactive_waiting(self) -> int:
        return self._waiting - self._waiting_background

    @property
    def busy(self) -> bool:
        return self.busy_since is not None

    @property
    def preparing(self) -> int:
        """Submitted jobs not queued yet: their prompt is being rendered and tokenised."""
        return self._preparing

    @property
    def running(self) -> int:
        return self._running

    @property
    def in_flight(self) -> int:
        return self._waiting + self._running

    def submit(self, request: GenerationRequest, *, background: bool = False) -> JobStream:
        job = Job(request, asyncio.get_running_loop(), background=background)
        with self._lock:
            if self._stopping:
                raise ModelUnavailableError(f"Tier {self.name} is shutting down", code="server_shutting_down")
            waiting = self._waiting - self._waiting_background
            if not background and waiting >= self.max_queue:
                raise RateLimitError(
                    f"Tier {self.name} has {waiting} requests waiting (limit {self.max_queue}); retry shortly",
                    retry_after=1,
                    code="queue_full",
                )
            self._waiting += 1
            self._waiting_background += background
            self._preparing += 1
            self._live.add(job)
        arrival = next(self._arrivals)  # first come, first served among the prepared
        try:
            self._preparer.submit(self._prepare, job, arrival)
        except RuntimeError:  # closing: the model's thread prepares it at admission, as it once did
            self._put(job, arrival)
            with self._lock:
                self._preparing -= 1
        return JobStream(job, self._withdraw)

    def _prepare(self, job: Job, arrival: int) -> None:
        try:
            if not job.cancelled.is_set():  # a cancelled job is dropped at admission
                job.state = self.backend.prepare(job.request)
        except Exception as exc:
            self._fail(job, exc)
            with self._lock:
                if not job.counted_out:
                    self._count_out(job)
                self.processed += 1
            self.finished_at = time.time()
            self._close_job(job)  # last: see `_end`
        else:
            self._put(job, arrival)
        finally:
            with self._lock:
                self._preparing -= 1

    def _put(self, job: Job | None, arrival: int | None = None) -> None:
        rank = _STOP if job is None else _BACKGROUND if job.background else _INTERACTIVE
        self._jobs.put((rank, next(self._arrivals) if arrival is None else arrival, job))

    def _take(self, block: bool = True) -> Job | None:
        job = self._jobs.get(block=block)[2]
        if job is not None:
            with self._lock:
                if not job.counted_out:  # else withdrawn already (cancelled while queued)
                    self._count_out(job)
        return job

    def _withdraw(self, job: Job) -> None:
        """A cancelled job that still waits leaves the counts now, not when the thread reaches it."""
        with self._lock:
            if not job.counted_out:
                self._count_out(job)

    def _count_out(self, job: Job) -> None:
        job.counted_out = True
        self._waiting -= 1
        self._waiting_background -= job.background

    def _close_job(self, job: Job) -> None:
        """The job's last event: nothing more comes after this."""
        job.put(None)
        with self._lock:
            self._live.discard(job)

    async def run(self, fn: Callable[[], None]) -> None:
        """Run `fn` on this model's thread between jobs (the engine is not thread-safe)."""
        job = Job(GenerationRequest(), asyncio.get_running_loop(), call=fn)
        with self._lock:
            if self._stopping:
                raise ModelUnavailableError(f"Tier {self.name} is shutting down", code="server_shutting_down")
            self._waiting += 1
            self._live.add(job)
        self._put(job)
        async for _ in JobStream(job, self._withdraw):
            pass

    def _run(self) -> None:
        while (job := self._take()) is not None:
            if job.cancelled.is_set():
                self._close_job(job)
                continue
            if job.call is not None:
                try:
                    job.call()
                except Exception:
                    log.exception("Tier %s: maintenance call failed", self.name)
                self._close_job(job)
                continue
            self.busy_since = time.monotonic()
            self._running = 1
            try:
                chunks = self.backend.stream_prepared(self._prepared(job), job.cancelled)
                with closing(chunks):  # type: ignore[type-var]
                    for chunk in chunks:
                        if job.cancelled.is_set():
                            break
                        job.put(chunk)
            except Exception as exc:
                self._fail(job, exc)
            finally:
                self._count_done()
                self._running = 0
                self._close_job(job)  # last: see `_end`

    def _fail(self, job: Job, exc: Exception) -> None:
        if isinstance(exc, EngineError):
            # engine_errors() keeps the library's exception as the cause: that is what to debug.
            log.error("Tier %s: %s", self.name, exc.message, exc_info=exc.__cause__ or exc)
        if isinstance(exc, LLMServiceError):
            job.put(exc)
        else:
            log.error("Tier %s: generation failed", self.name, exc_info=exc)
            job.put(EngineError(f"Generation failed on tier {self.name}; see the server log"))

    # -- continuous batching ---------------------------------------------------------------

    def _run_batched(self) -> None:
        size = self.backend.max_batch_size
        keys = itertools.count()
        held: Job | None = None  # a maintenance call runs once the batch is empty, as between jobs
        stopping = False
        while True:
            # Admit queued jobs (interactive first, then by arrival); block only when nothing decodes.
            while held is None and not stopping and len(self._active) < size:
                try:
                    job = self._take(block=not self._active)
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                if job.cancelled.is_set():
                    self._close_job(job)
                elif job.call is not None:
                    held = job
                else:
                    self._admit(next(keys), job)
            if self._active:
                self._step()
            elif held is not None:
                self._call(held)
                held = None
            elif stopping:
                break
        if self._batch is not None:
            self._batch.close()
            self._batch = None

    def _admit(self, key: int, job: Job) -> None:
        if not self._active:
            self.busy_since = time.monotonic()
        try:
            state = self._prepared(job)
            if not state.done:  # done already: nothing to generate (max_tokens 0)
                if self._batch is None:
                    self._batch = self.backend.open_batch()
                self._batch.add(key, state)
        except Exception as exc:
            self._fail(job, exc)
            self._count_done()
            self._close_job(job)
            return
        self._active[key] = (job, state)
        self._running = len(self._active)
        if state.done:
            self._finish(key)

    def _prepared(self, job: Job) -> DecodeState:
        """The job's prompt, prepared before it queued, still valid now that it starts decoding."""
        if job.state is None:
            return self.backend.prepare(job.request)
        self.backend.check_adapter(job.request)  # the adapter may have been unloaded since
        return job.state

    def _step(self) -> None:
        assert self._batch is not None
        try:
            for key, token in self._batch.step():
                if key not in self._active:  # a later token of a speculative run that ended (a stop string)
                    continue
                job, state = self._active[key]
                if isinstance(token, LLMServiceError):  # this sequence alone failed; it has left
                    self._fail(job, token)
                    self._end(key)
                    continue
                if token is not None and (chunk := state.add(token)):
                    job.put(chunk)
                if token is None or state.done:
                    self._batch.remove(key)  # a no-op when the sequence already left by itself
                    self._finish(key)
            for key, (job, _) in list(self._active.items()):
                if job.cancelled.is_set():
                    self._batch.remove(key)
                    self._end(key)
        except Exception as exc:
            # The batch is in an unknown state: fail what it held and start the next one afresh.
            for job, _ in self._active.values():
                self._fail(job, exc)
            for key in list(self._active):
                self._end(key)
            try:
                self._batch.close()
            except Exception:
                log.exception("Tier %s: closing a failed batch", self.name)
            self._batch = None

    def _finish(self, key: int) -> None:
        job, state = self._active[key]
        for chunk in state.finish():
            job.put(chunk)
        self._end(key)

    def _end(self, key: int) -> None:
        job, _ = self._active.pop(key)
        self._count_done()
        self._running = len(self._active)
        # Last: a client that has read its whole answer and asks at once for another model (which needs
        # this one's memory) must find this job counted finished, not the model still busy.
        self._close_job(job)

    def _count_done(self) -> None:
        """A job has ended: counted as processed (under the lock: `_prepare`'s threads count too),
        and the worker's busy time closed when nothing else runs. Before `running` drops."""
        with self._lock:
            self.processed += 1
        self.finished_at = time.time()
        if not self._active and self.busy_since is not None:
            self.busy_seconds += time.monotonic() - self.busy_since
            self.busy_since = None

    def _call(self, job: Job) -> None:
        assert job.call is not None
        try:
            job.call()
        except Exception:
            log.exception("Tier %s: maintenance call failed", self.name)
        self._close_job(job)

    def close(self, timeout: float | None = STOP_SECONDS) -> bool:
        """Stop the thread after the jobs queued so far; True once it has ended (the backend, closed
        by its owner, may then be freed: nothing of this worker touches it any more)."""
        self._preparer.shutdown(wait=True)  # prompts being prepared queue first, and use the engine no more
        self._put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the Executor protocol (service.tiers.slots) ---------------------------------------------
    def set_queue_limit(self, limit: int) -> None:
        self.max_queue = limit

    async def retire(self) -> bool:
        return await asyncio.to_thread(self.close, None)  # the stop marker ranks after every queued job

    async def stop(self) -> bool:
        with self._lock:
            self._stopping = True
            live = list(self._live)
        error = ModelUnavailableError(f"Tier {self.name} is shutting down", code="server_shutting_down")
        for job in live:
            job.put(error)  # first: its stream ends with this error, not silently
            job.cancelled.set()  # leaves the batch at the next step, or is skipped while queued
        return await asyncio.to_thread(self.close, STOP_SECONDS)

    def view(self) -> dict[str, Any]:
        busy, share = busy_fraction(self.busy_seconds, self.busy_since, self.started)
        return {
            "state": "busy" if self.busy else "idle",
            "processed": self.processed,
            "queued": self.waiting,
            "busy_seconds": round(busy, 3),
            "utilisation": round(share, 4),
        }
