"""The server's HTTP layer and event loop, side by side in one run (issue 28).

    python bench/bench_http_layer.py [--rounds 600] [--configs h11:asyncio,checked:asyncio,checked:auto]

Starts llmservice on the fake engine (no time per token) once per configuration, each with
`server_config`'s settings but uvicorn's `http` and `loop` set as named: `h11` (uvicorn's h11
protocol), `checked` (service/http_protocol.py on httptools, the server's own), `httptools`
(uvicorn's protocol as shipped); loops `asyncio`, `uvloop`, `auto` (the server's: uvloop where it
is installed). Then sends one streamed /v1/completions at a time from a raw keep-alive socket (no
HTTP client library in the way), rotating over the servers each round, and prints each one's
median time from the request's first byte to the first SSE event (the first 20 rounds warm up).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import free_port  # noqa: E402

PROTOCOLS = {"h11": "h11", "httptools": "httptools", "checked": None}  # None: server_config's own


def serve(port: int, http: str, loop: str) -> None:
    import uvicorn

    from backends.fake import FakeBackend, echo_last_line
    from service.__main__ import server_config
    from service.app import create_app
    from service.settings import parse_settings
    from service.testing import fake_engines

    backend = functools.partial(FakeBackend, reply=echo_last_line, token_seconds=0.0, max_batch=16)
    settings = parse_settings({"LIGHT_MODEL_PATH": "fake/light", "LIGHT_MAX_QUEUE": "64", "LOG_LEVEL": "WARNING"})
    app = create_app(settings, engines=dataclasses.replace(fake_engines(), backend=backend))
    overrides = {"loop": loop} | ({"http": PROTOCOLS[http]} if PROTOCOLS[http] else {})
    uvicorn.Server(server_config(app, settings, host="127.0.0.1", port=port, **overrides)).run()


class RawClient:
    """One keep-alive connection; times a streamed completion to its first SSE event."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def first_event(self, i: int) -> float:
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.streams
        body = json.dumps(
            {"model": "light", "prompt": f"Round {i}\nhello there", "max_tokens": 8, "stream": True, "temperature": 0}
        ).encode()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n" % self.port
        start = time.perf_counter()
        writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        first = 0.0
        assert b"chunked" in (await reader.readuntil(b"\r\n\r\n")).lower()
        while size := int((await reader.readline()).strip(), 16):
            data = await reader.readexactly(size + 2)
            if not first and b"data:" in data:
                first = time.perf_counter() - start
        await reader.readexactly(2)  # the last chunk's CRLF
        return first


async def measure(ports: list[int], rounds: int) -> list[list[float]]:
    clients = [RawClient(port) for port in ports]
    times: list[list[float]] = [[] for _ in ports]
    for i in range(rounds + 20):
        for k in range(len(clients)):  # rotate who goes first
            j = (i + k) % len(clients)
            ttft = await clients[j].first_event(i)
            if i >= 20:
                times[j].append(ttft)
    return times


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        serve(int(sys.argv[2]), sys.argv[3], sys.argv[4])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--configs", default="h11:asyncio,checked:asyncio,checked:auto")
    args = parser.parse_args()
    configs = [c.split(":") for c in args.configs.split(",")]
    ports = [free_port() for _ in configs]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, __file__, "--serve", str(port), http, loop], env=env)
        for port, (http, loop) in zip(ports, configs, strict=True)
    ]
    try:
        for port in ports:
            deadline = time.monotonic() + 60
            while '"loaded"' not in _get(f"http://127.0.0.1:{port}/health"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the server on {port} did not start")
                time.sleep(0.2)
        times = asyncio.run(measure(ports, args.rounds))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    print(f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f}; time to the first event:")
    for (http, loop), ttft in zip(configs, times, strict=True):
        quartiles = statistics.quantiles(ttft, n=4)
        print(
            f"  http={http:9s} loop={loop:7s} median {quartiles[1] * 1000:6.3f} ms  p25 {quartiles[0] * 1000:6.3f} ms"
        )


def _get(url: str) -> str:
    try:
        return httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return ""


if __name__ == "__main__":
    main()
