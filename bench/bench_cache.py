"""Response cache: latency of a hit vs a miss for the same chat request on the default model.

    python bench/bench_cache.py [--rounds 5] [--hits 20] [--tokens 64] [--record docs/benchmarks.md]

Starts `python -m service` with the default light tier (Gemma 3 270M Q4_K_M GGUF from PyPI,
n_ctx 4096) and ENABLE_CACHE=true. Each round sends a new deterministic chat request (temperature 0)
once (a miss: the model generates) and then `--hits` times (hits: replayed from the cache).
Server time is the `X-Process-Time` header (request arrival to response start, in ms); client time
is the full round trip from this process over HTTP/1.1 keep-alive. Targets: a hit costs at most
2 ms of server time and is at least 50x faster than the miss.

`--record FILE` writes the results into FILE's "## Response cache" section (created if missing;
other sections are left alone).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import free_port, llmservice, median, pct, process

HEADING = "## Response cache"


def timed(http: httpx.Client, body: dict[str, object]) -> tuple[str, float, float]:
    start = time.perf_counter()
    res = http.post("/v1/chat/completions", json=body)
    client_ms = (time.perf_counter() - start) * 1000
    res.raise_for_status()
    return res.headers["X-Cache"], float(res.headers["X-Process-Time"]), client_ms


def run(rounds: int, hits: int, tokens: int) -> dict[str, list[float]]:
    port = free_port()
    cmd, env = llmservice({"PORT": str(port), "ENABLE_CACHE": "true", "LIGHT_N_THREADS": "2"})
    url = f"http://127.0.0.1:{port}"
    out: dict[str, list[float]] = {"miss_server": [], "miss_client": [], "hit_server": [], "hit_client": []}
    with process(cmd, f"{url}/health", env, ready='"state":"loaded"'), httpx.Client(base_url=url, timeout=600) as http:
        # Warm-up: the first request pays one-off costs (connection, first decode).
        http.post("/v1/chat/completions", json={"model": "light", "messages": [{"role": "user", "content": "Hi"}]})
        for i in range(rounds):
            body = {
                "model": "light",
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"Round {i}: write a short paragraph about the sea."},
                ],
                "max_tokens": tokens,
                "temperature": 0,
            }
            state, server_ms, client_ms = timed(http, body)
            assert state == "MISS", state
            out["miss_server"].append(server_ms)
            out["miss_client"].append(client_ms)
            for _ in range(hits):
                state, server_ms, client_ms = timed(http, body)
                assert state == "HIT", state
                out["hit_server"].append(server_ms)
                out["hit_client"].append(client_ms)
    return out


def report(results: dict[str, list[float]], command: str, tokens: int, load: float) -> str:
    def row(name: str, key: str) -> str:
        values = results[key]
        return f"| {name} | {median(values):.3f} | {pct(values, 0.95):.3f} | {len(values)} |"

    server_ratio = median(results["miss_server"]) / median(results["hit_server"])
    client_ratio = median(results["miss_client"]) / median(results["hit_client"])
    hit_ok = median(results["hit_server"]) <= 2.0
    return "\n".join(
        [
            HEADING,
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}; "
            f"run on {time.strftime('%Y-%m-%d')}. Default light tier (Gemma 3 270M Q4_K_M GGUF, n_ctx 4096,"
            f" 2 threads), temperature 0, max_tokens {tokens}, non-streaming chat; HTTP/1.1 keep-alive."
            f" Load average before the run: {load:.1f} (other work on this shared machine slows the misses).",
            "",
            "| request | median ms | p95 ms | n |",
            "|---|---|---|---|",
            row("miss, server time (X-Process-Time)", "miss_server"),
            row("hit, server time (X-Process-Time)", "hit_server"),
            row("miss, client round trip", "miss_client"),
            row("hit, client round trip", "hit_client"),
            "",
            f"Miss/hit ratio: **{server_ratio:.0f}x** server time, **{client_ratio:.0f}x** client round trip. "
            f"Targets: hit <= 2 ms server time ({'met' if hit_ok else 'NOT met'}), >= 50x faster than the "
            f"miss ({'met' if server_ratio >= 50 else 'NOT met'}). A miss generates up to {tokens} tokens, so its"
            " time follows the output length and the machine's load; a hit is one lookup and one decode.",
            "",
        ]
    )


def record(path: Path, section: str) -> None:
    """Replace our section (up to the next `## ` heading) or append it; leave the rest alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hits", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--record", type=Path, help="write the results into this markdown file")
    args = parser.parse_args()
    command = "python bench/bench_cache.py " + " ".join(sys.argv[1:])
    load = os.getloadavg()[0]
    section = report(run(args.rounds, args.hits, args.tokens), command.strip(), args.tokens, load)
    print(section)
    if args.record:
        record(args.record, section)


if __name__ == "__main__":
    main()
