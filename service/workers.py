"""One worker thread per loaded generation model.

llama.cpp and MLX models are not thread-safe (two threads on one `Llama` crash the process), so
each model gets exactly one thread that runs jobs in arrival order. The event loop talks to it
through a bounded job queue and an asyncio queue of chunks per job.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass, field

from backends.base import Backend, Chunk, GenerationRequest
from service.errors import EngineError, LLMServiceError, RateLimitError

log = logging.getLogger(__name__)

_Event = Chunk | LLMServiceError | None  # None ends the stream


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[_Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)

    def put(self, event: _Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            self.cancelled.set()


class JobStream:
    """The chunks of one job as an async iterator; leaving early cancels the generation."""

    def __init__(self, job: Job) -> None:
        self._job = job
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
        self._job.cancelled.set()


class GenerationWorker:
    def __init__(self, name: str, backend: Backend, max_queue: int) -> None:
        self.name = name
        self.backend = backend
        self.max_queue = max_queue
        self.processed = 0
        self.busy_since: float | None = None
        self.busy_seconds = 0.0
        self.started = time.monotonic()
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"llm-worker-{name}", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def busy(self) -> bool:
        return self.busy_since is not None

    @property
    def in_flight(self) -> int:
        return self._waiting + (1 if self.busy else 0)

    def submit(self, request: GenerationRequest) -> JobStream:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise RateLimitError(
                    f"Tier {self.name} has {self._waiting} requests waiting (limit {self.max_queue}); retry shortly",
                    retry_after=1,
                    code="queue_full",
                )
            self._waiting += 1
        job = Job(request, asyncio.get_running_loop())
        self._jobs.put(job)
        return JobStream(job)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._waiting -= 1
            if job.cancelled.is_set():
                job.put(None)
                continue
            self.busy_since = time.monotonic()
            try:
                with closing(self.backend.stream(job.request)) as chunks:  # type: ignore[type-var]
                    for chunk in chunks:
                        if job.cancelled.is_set():
                            break
                        job.put(chunk)
            except LLMServiceError as exc:
                job.put(exc)
            except Exception:
                log.exception("Tier %s: generation failed", self.name)
                job.put(EngineError(f"Generation failed on tier {self.name}; see the server log"))
            finally:
                job.put(None)
                self.processed += 1
                self.busy_seconds += time.monotonic() - self.busy_since
                self.busy_since = None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after the current job; the backend is closed by its owner."""
        self._jobs.put(None)
        self._thread.join(timeout)
