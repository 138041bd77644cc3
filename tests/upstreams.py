"""Upstream servers for the remote-tier tests (issue 28): llmservice processes (on the fake
engines, or a real model), a socket that never answers, a server answering 500 or garbage, a
stand-in for vLLM's stream that echoes the request it got."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Upstream:
    """`tests/fake_upstream.py` in a process of its own, or (`env` given) `python -m service` with
    that environment: a real model's server."""

    def __init__(self, token_seconds: float = 0.0, mode: str = "echo", env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        base = {k: v for k, v in os.environ.items() if k.split("_", 1)[0] not in {"LIGHT", "PORT"}}
        if env is None:
            command = [str(ROOT / "tests" / "fake_upstream.py"), str(self.port), str(token_seconds), mode]
        else:
            command = ["-m", "service"]
            base |= {**env, "PORT": str(self.port), "PORT_AUTO_INCREMENT": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, *command],
            env={**base, "PYTHONPATH": str(ROOT)},
            cwd=ROOT if env is None else tempfile.mkdtemp(prefix="llmservice-upstream-"),  # its .port file
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait(self) -> Upstream:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the upstream exited"
            try:
                models = httpx.get(f"{self.url}/models", timeout=1).json()["data"]
                if all(m["status"] == "loaded" for m in models if m.get("tier") == "light"):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("upstream did not start")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@contextmanager
def upstreams(*specs: tuple[float, str]) -> Iterator[list[Upstream]]:
    started = [Upstream(seconds, mode) for seconds, mode in specs]
    try:
        yield [u.wait() for u in started]
    finally:
        for u in started:
            u.kill()


@contextmanager
def bad_server(kind: str) -> Iterator[str]:
    """`hang`: accepts and never answers; `500`: answers every request 500; `garbage`: 200 with junk SSE;
    `vllm`: streams back the request it was sent, as its answer's text, ended (as vLLM does) with
    `stop_reason` naming the request's last stop string."""
    if kind == "hang":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        finally:
            sock.close()
        return

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            sent = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if kind == "vllm" and not self.path.endswith("/models"):
                self.send_response(200)
                body = _vllm_stream(json.loads(sent))
            elif kind == "500":
                self.send_response(500)
                body = b'{"error": {"message": "boom"}}'
            else:
                self.send_response(200)
                body = b'{"data": [{"id": "junk"}]}' if self.path.endswith("/models") else b"data: not json\n\n"
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _vllm_stream(request: dict[str, Any]) -> bytes:
    stops = request.get("stop") or [None]
    events: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"content": json.dumps(request)}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": stops[-1]}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}},
    ]
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"
