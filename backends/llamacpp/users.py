"""Who is inside the model's native memory besides its worker thread: tokenizing for `/tokenize`
or a request's preparation, compiling a grammar. `close` frees the model only once they are out."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from kernel.errors import ModelUnavailableError


class NativeUsers:
    """A count of threads using the model's handles. Once closing, new users get a 503 instead of
    freed memory; `close` waits for those already in."""

    def __init__(self, tier: str) -> None:
        self._tier = tier
        self._changed = threading.Condition()
        self._inside = 0
        self._closing = False

    @contextmanager
    def use(self) -> Iterator[None]:
        with self._changed:
            if self._closing:
                raise ModelUnavailableError(f"Tier {self._tier}: the model was unloaded; retry")
            self._inside += 1
        try:
            yield
        finally:
            with self._changed:
                self._inside -= 1
                self._changed.notify_all()

    def close(self, timeout: float) -> bool:
        """Refuse new users; True once none is left (within `timeout` seconds)."""
        with self._changed:
            self._closing = True
            return self._changed.wait_for(lambda: self._inside == 0, timeout)
