"""The shutdown clock open streams poll (its own module: the Generation object owns one, and
service.serving.streaming reads it)."""

from __future__ import annotations

import time


class Drain:
    """Set when the server starts shutting down. uvicorn cuts open connections DRAIN_SECONDS later
    (a chunked body cut mid-stream); streams still open a second before that end with an error
    event and `[DONE]` instead, so clients see why."""

    def __init__(self) -> None:
        self.deadline: float | None = None

    def begin(self, seconds: float) -> None:
        """Called from the signal handler: only stores a float, which streams poll."""
        if self.deadline is None:
            self.deadline = time.monotonic() + max(0.0, seconds - 1.0)

    @property
    def due(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline
