"""Helpers shared by the benchmarks: start servers as subprocesses, time token streams."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# The generation benchmarks' prompt; `{i}` makes each one unique, so the response cache never answers it.
PROMPT = "Round {i}. Here is a long list of fruits, one per line, numbered:\n1. apple\n2."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def process(
    cmd: Sequence[str],
    ready_url: str,
    env: dict[str, str] | None = None,
    ready: str | None = None,
    timeout: float = 180,
    log: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server until `ready_url` answers 200 (and contains `ready`, if given), in an empty
    working folder: llmservice would otherwise read the checkout's `.env` (start_service.sh writes
    one) and load its tiers beside the benchmark's. Its output goes to `log` when given (a server
    that dies before it is ready raises with the log's tail), otherwise nowhere."""
    folder = tempfile.TemporaryDirectory(prefix="bench-cwd-")
    out = log.open("wb") if log else None
    proc = subprocess.Popen(
        list(cmd),
        cwd=folder.name,
        env={**os.environ, **(env or {})},
        stdout=out or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if out else subprocess.DEVNULL,
    )
    if out:
        out.close()  # the server holds its own descriptor
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                ending = f"; end of {log}:\n{tail(log)}" if log else ""
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}{ending}")
            try:
                res = httpx.get(ready_url, timeout=2)
                if res.status_code == 200 and (ready is None or ready in res.text):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd} did not become ready")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        folder.cleanup()


def tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def llmservice(env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    port = env["PORT"]
    full = {
        "PORT_AUTO_INCREMENT": "false",
        "PORT_FILE": f"/tmp/llmservice-bench-{port}.port",
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # `-m service` from the checkout, whatever the working folder
        "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
        **env,
    }
    return [sys.executable, "-m", "service"], full


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time a process (or one of its threads) has used (Linux /proc)."""
    stat = Path(f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat")
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class StreamTiming:
    ttft: float  # seconds from sending the request to the first content
    tokens: int
    decode_seconds: float  # first content to last content
    end: float  # monotonic time the stream finished
    text: str = ""  # the streamed answer (stream_completion only)

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0


_local = threading.local()


def _client() -> httpx.Client:
    """One keep-alive client per thread, as an SDK keeps one: building an httpx.Client per request
    (its SSL context) cost ~30 ms, which showed up as server time to first token."""
    client: httpx.Client | None = getattr(_local, "client", None)
    if client is None:
        client = _local.client = httpx.Client(timeout=600)
    return client


def stream_completion(url: str, body: dict[str, object]) -> StreamTiming:
    """POST a streaming completion; count content events (one per token) and time them. Sent again
    once if the server closed the keep-alive connection as it was reused (llama-server drops one
    idle for 5 s, and closes some after a streamed answer)."""
    try:
        return _stream_once(url, body)
    except httpx.RemoteProtocolError:
        return _stream_once(url, body)


def _stream_once(url: str, body: dict[str, object]) -> StreamTiming:
    start = time.monotonic()
    first = last = 0.0
    tokens = 0
    usage_tokens = None
    pieces: list[str] = []
    with _client().stream("POST", url, json={**body, "stream": True}) as res:
        res.raise_for_status()
        for line in res.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage_tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                if piece := choice.get("text") or (choice.get("delta") or {}).get("content"):
                    now = time.monotonic()
                    first = first or now
                    last = now
                    tokens += 1
                    pieces.append(piece)
    return StreamTiming(first - start, usage_tokens or tokens, last - first, time.monotonic(), "".join(pieces))


def time_pieces(pieces: Iterable[str], start: float) -> StreamTiming:
    """Time an in-process stream requested at `start`: each non-empty text piece is one token."""
    first = last = 0.0
    tokens = 0
    for text in pieces:
        if text:
            now = time.monotonic()
            first = first or now
            last = now
            tokens += 1
    return StreamTiming(first - start, tokens, last - first, time.monotonic())


# llama-cpp-python's create_completion defaults, sent explicitly so every contender samples alike
# (a server's tier defaults, e.g. REPEAT_PENALTY=1.1, would otherwise cost it ~8 % per token).
SAMPLING: dict[str, object] = {"temperature": 0, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}


def concurrent_streams(
    url: str,
    model: str,
    streams: int,
    tokens: int,
    tag: str,
    stagger: float = 0.05,
    sampling: Mapping[str, object] = SAMPLING,
) -> tuple[float, list[StreamTiming]]:
    """`streams` simultaneous streaming completions of PROMPT (sampled with `sampling`): aggregate
    tokens/s over the wall time, and the streams that finished, in arrival order."""
    results: list[StreamTiming | None] = [None] * streams

    def run(i: int) -> None:
        body: dict[str, object] = {
            "model": model,
            "prompt": PROMPT.format(i=f"{tag}-{streams}-{i}"),
            "max_tokens": tokens,
            **sampling,
            "stream_options": {"include_usage": True},
        }
        try:
            results[i] = stream_completion(url, body)
        except httpx.HTTPError as exc:
            print(f"    stream {i} of {streams} failed: {exc}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
        time.sleep(stagger)  # a defined arrival order, even with both cores busy decoding
    for t in threads:
        t.join()
    done = [r for r in results if r is not None]
    if not done:
        return 0.0, []
    return sum(r.tokens for r in done) / (max(r.end for r in done) - t0), done


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
