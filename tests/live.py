"""A real uvicorn server running `create_app(settings)` in a thread, for tests that speak HTTP."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from litestar.testing import TestClient

from backends.base import GenerationRequest
from backends.fake import FakeBackend
from service.__main__ import configure_logging, server_config
from service.app import create_app
from service.settings import parse_settings
from service.testing import fake_engines
from service.tiers.families import EngineFactories
from service.tiers.slots import TierState
from service.tiers.workers import GenerationWorker


def recording_backend(seen: list[GenerationRequest]) -> type[FakeBackend]:
    class RecordingBackend(FakeBackend):
        """The fake engine, keeping each request it is given (thinking switch, budget, tools)."""

        def decode(self, prompt: list[int], request: GenerationRequest, max_tokens: int, cancel: Any = None) -> Any:
            seen.append(request)
            return super().decode(prompt, request, max_tokens, cancel)

    return RecordingBackend


class LiveServer:
    def __init__(
        self, env: Mapping[str, str], env_file: Path | None = None, engines: EngineFactories | None = None
    ) -> None:
        """`engines`: e.g. `service.testing.fake_engines(reply=...)` for a scripted model."""
        # Collections and batch files go to folders of this server's own unless a test names one
        # (a restart test): never into the checkout.
        prefixes = {"BATCH_DIR": "llmservice-batches-", "COLLECTIONS_DIR": "llmservice-collections-"}
        self._own_dirs = {key: tempfile.mkdtemp(prefix=prefix) for key, prefix in prefixes.items() if key not in env}
        defaults = {"LOG_LEVEL": "WARNING", **self._own_dirs}
        self.settings = parse_settings({**defaults, **env})
        configure_logging(self.settings.log_level)  # as `python -m service` does
        self.app = create_app(self.settings, env_file=env_file, engines=engines)
        # IPPROTO_TCP: asyncio then sets TCP_NODELAY on connections (see service.__main__.bind).
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = server_config(self.app, self.settings, log_level="warning", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        # The event loop `python -m service` runs on (uvloop where it is installed).
        with asyncio.Runner(loop_factory=self._server.config.get_loop_factory()) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()  # for tests that schedule work on the app's loop
        await self._server.serve(sockets=[self._sock])

    def start(self, wait_for: tuple[str, ...] = ()) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self._server.started:
                tiers = httpx.get(f"{self.url}/health").json()["tiers"]
                if all(tiers.get(t, {}).get("state") in ("loaded", "failed") for t in wait_for):
                    return self
            time.sleep(0.05)
        raise TimeoutError("server did not start")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()
        for folder in self._own_dirs.values():
            shutil.rmtree(folder, ignore_errors=True)

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)  # type: ignore[arg-type]


@contextmanager
def fake_app(
    env: Mapping[str, str], engines: EngineFactories | None = None, headers: Mapping[str, str] | None = None
) -> Iterator[TestClient]:  # type: ignore[type-arg]
    """The app in-process (Litestar's TestClient) on fake engines (`service.testing.fake_engines()`
    unless given), once every preloading tier has loaded: tiers preload in the background, as in
    production. Batch files and stored responses go to a folder of its own unless `env` names one."""
    with tempfile.TemporaryDirectory(prefix="llmservice-batches-") as batches:
        app = create_app(parse_settings({"BATCH_DIR": batches, **env}), engines=engines or fake_engines())
        with TestClient(app, base_url="http://localhost") as http:
            http.headers.update(headers or {})
            registry = app.state.registry
            http.blocking_portal.call(registry.preloaded)  # on the app's loop, where the loads run
            failed = {s.name: s.error for s in registry.slots.values() if s.state is TierState.FAILED}
            assert not failed, f"the fake engines did not load: {failed}"
            yield http


@contextmanager
def live_server(
    env: Mapping[str, str],
    wait_for: tuple[str, ...] = (),
    env_file: Path | None = None,
    engines: EngineFactories | None = None,
) -> Iterator[LiveServer]:
    server = LiveServer(env, env_file, engines).start(wait_for)
    try:
        yield server
    finally:
        server.stop()


def error_of(res: httpx.Response, status: int) -> dict[str, object]:
    """The OpenAI error envelope, alone in the body, with `status` and no traceback."""
    assert res.status_code == status, res.text
    body = res.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert "Traceback" not in error["message"]
    return error  # type: ignore[no-any-return]


def completion_text(res: httpx.Response) -> str:
    """A 200 completion's text (choice 0)."""
    assert res.status_code == 200, res.text
    return str(res.json()["choices"][0]["text"])


def assert_second_answer_is_cached(http: httpx.Client, worker: GenerationWorker, chat: dict[str, object]) -> None:
    """A deterministic chat asked twice: the second answer comes from the response cache (same text
    and usage, cached prompt tokens, a fresh id) and the model does not run again."""
    first = http.post("/v1/chat/completions", json=chat)
    assert first.status_code == 200, first.text
    assert first.headers["X-Cache"] == "MISS"
    deadline = time.monotonic() + 10
    while worker.busy and time.monotonic() < deadline:  # the worker counts a job just after its last chunk
        time.sleep(0.01)
    processed = worker.processed
    second = http.post("/v1/chat/completions", json=chat)
    assert second.status_code == 200, second.text
    assert second.headers["X-Cache"] == "HIT"
    assert second.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    usage = second.json()["usage"]
    assert usage["completion_tokens"] == first.json()["usage"]["completion_tokens"]
    assert (
        usage["prompt_tokens_details"]["cached_tokens"]
        == usage["prompt_tokens"]
        == first.json()["usage"]["prompt_tokens"]
    )
    assert second.json()["id"] != first.json()["id"]  # a fresh envelope around the cached result
    assert worker.processed == processed  # the model did not run
    stats = http.get("/v1/cache/stats").json()["response"]
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 1, 1) and stats["bytes"] > 0
    assert stats["hit_rate"] == 0.5
