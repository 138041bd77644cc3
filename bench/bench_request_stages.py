"""Where one streamed request spends its time inside llmservice, stage by stage (issue 28).

    python bench/bench_request_stages.py [--rounds 300] [--agent] [--upstream llama|raw] [--root CHECKOUT]

Starts a llama-server (the tiny32k GGUF, `-t 1`; `--upstream raw`: bench/raw_upstream.py, no model,
which `--agent` needs: 130 KB is past the tiny model's context) and, in a child process, a front with a remote
light tier over it whose stages are stamped: the ASGI app is wrapped, and so are the middleware,
the security checks, Litestar's kwargs/DI/signature steps, the serving functions, the pool's
acquire/send/first-event steps and the ASGI sends (wall clock, `perf_counter`, ms from the app's
ASGI entry; each stage's first time per request). One client on a kept-alive connection sends
streamed `/v1/completions` and `/v1/chat/completions` requests in turn (`--agent`: each chat request
carries a 130 KB coding-agent conversation) and the front prints the medians. The stamps cost a few
us each: compare stages, not the total with an unstamped server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import free_port, process
from bench.bench_remote import upstream
from bench.bench_streams import TINY32K, ensure_model

HERE = Path(__file__).resolve().parents[1]
STAMPS = "/__stamps"


@contextmanager
def raw_upstream() -> Iterator[str]:
    """bench/raw_upstream.py on a free port: its base URL (ending /v1)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    with process([sys.executable, str(HERE / "bench" / "raw_upstream.py"), str(port)], f"{base}/models"):
        yield base


def agent_conversation() -> list[dict[str, Any]]:
    """A coding agent's history, ~130 KB of JSON: tool calls and file contents."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a coding agent. " * 200}]
    for i in range(60):
        call = {
            "id": f"c{i}",
            "type": "function",
            "function": {"name": "read_file", "arguments": f'{{"path": "f{i}.py"}}'},
        }
        messages.append({"role": "user", "content": f"Please look at file {i} and fix the bug " * 20})
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"c{i}", "content": "def f():\n    return 1\n" * 40})
    return messages


def serve(root: str, port: int, url: str) -> None:
    """The stamped front (runs in the child process)."""
    import contextvars

    sys.path.insert(0, root)
    import uvicorn
    from litestar._kwargs.kwargs_model import KwargsModel
    from litestar._signature.model import SignatureModel
    from litestar.handlers.http_handlers.base import HTTPRouteHandler

    import backends.remote as remote
    import service.app as app_module
    import service.controllers.chat as chat_controller
    import service.controllers.completions as completions_controller
    import service.serving.chat as chat
    import service.serving.generation as generation
    from service.disconnect import DisconnectMiddleware
    from service.metrics import TelemetryMiddleware
    from service.security import Security
    from service.settings import parse_settings
    from service.tiers.registry import Registry

    current: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("stamps", default=None)
    done: dict[str, list[dict[str, float]]] = {"chat": [], "completions": []}

    def stamp(name: str) -> None:
        stamps = current.get()
        if stamps is not None and name not in stamps:
            stamps[name] = time.perf_counter()

    def around(owner: Any, attr: str, before: str, after: str | None = None) -> None:
        fn = getattr(owner, attr)

        async def stamped(*args: Any, **kwargs: Any) -> Any:
            stamp(before)
            result = await fn(*args, **kwargs)
            if after:
                stamp(after)
            return result

        setattr(owner, attr, stamped)

    def around_sync(owner: Any, attr: str, before: str, after: str | None = None) -> None:
        fn = getattr(owner, attr)

        def stamped(*args: Any, **kwargs: Any) -> Any:
            stamp(before)
            result = fn(*args, **kwargs)
            if after:
                stamp(after)
            return result

        setattr(owner, attr, stamped)

    around(TelemetryMiddleware, "__call__", "telemetry middleware")
    around(DisconnectMiddleware, "__call__", "disconnect middleware")
    around(Security, "guard", "security checks (before_request)")
    around(KwargsModel, "to_kwargs", "kwargs: body read and decoded")
    around(app_module.JsonRequest, "json", "body decode", "body decoded")
    around(KwargsModel, "resolve_dependencies", "dependencies", "dependencies resolved")
    around(chat_controller, "serve_chat", "handler entered", "handler returns the stream")
    around(completions_controller, "serve_completion", "handler entered", "handler returns the stream")
    around_sync(chat, "chat_messages", "chat messages", "chat messages converted")
    around_sync(chat, "engine_request", "engine request", "engine request built")
    around(generation.Generation, "generate", "generate()", "generate() submitted")
    around(Registry, "ensure_loaded", "ensure_loaded")
    around(chat, "first_chunk", "waits for the first chunk", "first chunk in the handler")
    around(remote.RemotePool, "_acquire", "pool: acquire an upstream", "pool: upstream acquired")
    around(remote.RemotePool, "_send", "relay: request sent", "relay: upstream headers in")
    around(remote.RemotePool, "_first", "relay: reading events", "relay: first chunk parsed")
    around(HTTPRouteHandler, "to_response", "to_response", "to_response done")
    parse = SignatureModel.parse_values_from_connection_kwargs.__func__  # type: ignore[attr-defined]

    def parse_stamped(cls: Any, *args: Any, **kwargs: Any) -> Any:
        stamp("signature model")
        return parse(cls, *args, **kwargs)

    SignatureModel.parse_values_from_connection_kwargs = classmethod(parse_stamped)  # type: ignore[method-assign,assignment]
    env = {"LIGHT_BACKEND": "remote", "LIGHT_REMOTE_URLS": url, "LIGHT_MAX_QUEUE": "64", "LOG_LEVEL": "WARNING"}
    app = app_module.create_app(parse_settings(env))

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(("/v1/c", STAMPS)):
            await app(scope, receive, send)
            return
        if scope["path"] == STAMPS:
            await _answer_stamps(send, done)
            return
        stamps = {"t0": time.perf_counter()}
        token = current.set(stamps)
        bodies = 0

        async def sending(message: Any) -> None:
            nonlocal bodies
            if message["type"] == "http.response.start":
                stamp("http.response.start to the server")
                await send(message)
                stamp("headers written (server)")
                return
            if message.get("body"):
                bodies += 1
                if bodies == 1:
                    stamp("first event to the server")
                    await send(message)
                    stamp("first event written (server)")
                    return
            await send(message)

        try:
            await app(scope, receive, sending)
        finally:
            current.reset(token)
            t0 = stamps.pop("t0")
            kind = "chat" if "chat" in scope["path"] else "completions"
            done[kind].append({name: (t - t0) * 1000 for name, t in stamps.items()})

    uvicorn.run(outer, host="127.0.0.1", port=port, log_level="warning", http="h11", loop="asyncio")


async def _answer_stamps(send: Any, done: dict[str, list[dict[str, float]]]) -> None:
    table: dict[str, list[tuple[str, float]]] = {}
    for kind, rows in done.items():
        rows = rows[20:]  # warm-up
        names: dict[str, list[float]] = {}
        for row in rows:
            for name, value in row.items():
                names.setdefault(name, []).append(value)
        table[kind] = sorted(((n, statistics.median(v)) for n, v in names.items()), key=lambda x: x[1])
    body = json.dumps(table).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def _client(port: int, rounds: int, agent: bool) -> dict[str, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    history = agent_conversation() if agent else []

    async def one(path: str, body: dict[str, Any]) -> float:
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        started = time.perf_counter()
        writer.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        first = None
        answer = await reader.readuntil(b"\r\n\r\n")
        assert b" 200 " in answer.split(b"\r\n")[0], answer
        while True:  # chunked transfer encoding
            size = int((await reader.readline()).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            if first is None and b"data:" in chunk:
                first = time.perf_counter() - started
        assert first is not None
        return first * 1000

    ttft: dict[str, list[float]] = {"completions": [], "chat": []}
    common = {"model": "light", "max_tokens": 4, "stream": True, "temperature": 0.5}
    for i in range(rounds + 20):
        prompt = f"Round {i}. Say hello"
        ttft["completions"].append(await one("/v1/completions", {**common, "prompt": prompt}))
        messages = [*history, {"role": "user", "content": prompt}]
        ttft["chat"].append(await one("/v1/chat/completions", {**common, "messages": messages}))
    writer.close()
    return {kind: statistics.median(values[20:]) for kind, values in ttft.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--agent", action="store_true", help="chat requests carry a 130 KB agent conversation")
    parser.add_argument("--root", default=str(HERE), help="the checkout whose app is stamped")
    parser.add_argument("--model", default=str(TINY32K))
    parser.add_argument("--upstream", choices=["llama", "raw"], default="llama")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)  # the child: root port upstream-url
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.serve[2])
        return
    with ExitStack() as stack:
        if args.upstream == "raw":
            url = stack.enter_context(raw_upstream())
        else:
            url = stack.enter_context(upstream(ensure_model(args.model), 2, 1))[0]
        port = free_port()
        child = subprocess.Popen([sys.executable, __file__, "--serve", args.root, str(port), url])
        try:
            for _ in range(300):
                try:
                    if b'"loaded"' in urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read():
                        break
                except OSError:
                    time.sleep(0.1)
            client = asyncio.run(_client(port, args.rounds, args.agent))
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{STAMPS}") as answer:
                table = json.load(answer)
        finally:
            child.kill()
    load = os.getloadavg()[0]
    print(f"{args.upstream} upstream, {args.rounds} rounds, load average {load:.1f}; medians, ms from the ASGI entry")
    for kind, rows in table.items():
        print(f"\n{kind} (client's time to first token {client[kind]:.2f} ms)")
        for name, value in rows:
            print(f"  {value:7.3f}  {name}")


if __name__ == "__main__":
    main()
