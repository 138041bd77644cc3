"""Admin pulls and deletes of models in MODELS_DIR: the HTTP-free part of `POST /v1/models/pull`
and `DELETE /v1/models/{id}` (the downloads themselves are in `hub`)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from kernel.errors import ConflictError, LLMServiceError
from service.lifecycle import Lifecycle
from service.serving import hub
from service.tiers.slots import TierState

_encode = msgspec.json.Encoder().encode
log = logging.getLogger(__name__)


class Pulls:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    @property
    def models_dir(self) -> str:
        return self.lifecycle.settings.models_dir

    async def pull(self, spec: str, revision: str | None) -> str:
        plan = await asyncio.to_thread(hub.plan, spec, revision)
        return await asyncio.to_thread(hub.pull, plan, self.models_dir, lambda _: None)

    async def events(self, spec: str, revision: str | None) -> AsyncIterator[bytes]:
        """SSE: `downloading` events (at most ~10 a second a file), then `success` or one `error`."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        last: dict[str, Any] = {"at": 0.0, "file": ""}

        def progress(event: dict[str, Any]) -> None:
            now = loop.time()
            if event["completed"] < event["total"] and now - last["at"] < 0.1 and last["file"] == event["file"]:
                return
            last.update(at=now, file=event["file"])
            loop.call_soon_threadsafe(queue.put_nowait, event)

        stop = threading.Event()

        def work() -> str:
            return hub.pull(hub.plan(spec, revision), self.models_dir, progress, stop)

        task = asyncio.ensure_future(asyncio.to_thread(work))
        task.add_done_callback(_retrieved)  # a stopped pull ends with PullStopped that no one awaits
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                try:
                    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    getter.cancel()
                if not getter.cancelled() and getter.done():
                    yield b"data: " + _encode(getter.result()) + b"\n\n"
                    continue
                while not queue.empty():
                    yield b"data: " + _encode(queue.get_nowait()) + b"\n\n"
                break
        finally:  # the client went away (or the pull ended): a download still running stops, resumable
            if not task.done():
                stop.set()
                log.info("Pull of %s: the client disconnected; stopping (a later pull resumes)", spec)
        try:
            yield b"data: " + _encode({"status": "success", "id": task.result()}) + b"\n\n"
        except LLMServiceError as exc:
            yield b"data: " + _encode({"status": "error", **exc.envelope()}) + b"\n\n"
        except Exception as exc:  # the stream has started: report in it rather than cut it
            yield b"data: " + _encode({"status": "error", "error": {"message": str(exc)}}) + b"\n\n"

    def delete(self, model_id: str) -> str:
        """Remove a pulled model from MODELS_DIR; 409 while a tier has it loaded."""
        paths = hub.model_files(self.models_dir, model_id)
        for slot in self.lifecycle.registry.slots.values():
            loaded = slot.path or slot.settings.model_path
            if slot.state not in (TierState.LOADED, TierState.LOADING) or not loaded:
                continue
            where = Path(os.path.abspath(os.path.expanduser(loaded)))
            if any(where == p or p in where.parents for p in paths):
                raise ConflictError(
                    f"{model_id} is loaded in tier {slot.name}; unload it first", param="model", code="model_loaded"
                )
        hub.remove(paths)
        return model_id


def _retrieved(task: asyncio.Future[str]) -> None:
    if not task.cancelled():
        task.exception()
