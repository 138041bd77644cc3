"""What runs a loaded model's work, as the registry and the views see it."""

from __future__ import annotations

import time
from typing import Any, Protocol


class Executor(Protocol):
    """What runs a loaded model's work, one thread per model: a generation worker (requests) or an
    embedding/rerank micro-batcher (inputs). The registry and the views see it only through this."""

    @property
    def in_flight(self) -> int: ...  # accepted and not finished: waiting or running

    @property
    def waiting(self) -> int: ...  # not started yet

    @property
    def interactive_waiting(self) -> int: ...  # waiting, batch-job lines not counted

    @property
    def busy(self) -> bool: ...

    @property
    def processed(self) -> int: ...  # jobs (generation) or batches (micro-batcher) finished

    def set_queue_limit(self, limit: int) -> None: ...

    async def retire(self) -> bool:
        """Refuse new work, finish what was accepted, stop. True once nothing runs on the engine
        any more, so it may be freed."""

    async def stop(self) -> bool:
        """Refuse new work, fail what waits and what runs (after the running step), stop (server
        shutdown). True as for `retire`; False: the engine may still be in use and must not be freed."""

    def view(self) -> dict[str, Any]: ...  # the `worker` object of /v1/stats and model details


def busy_fraction(busy_seconds: float, busy_since: float | None, started: float) -> tuple[float, float]:
    """Seconds an executor has been busy so far, and that as a share of its life."""
    now = time.monotonic()
    busy = busy_seconds + (now - busy_since if busy_since is not None else 0.0)
    return busy, min(1.0, busy / max(now - started, 1e-9))
