"""Images on llama.cpp: llmservice vs llama-server with the same GGUF and projector (issue 26).

    python bench/bench_vision.py [--model GGUF --mmproj GGUF] [--concurrency 1,4] [--requests 8] [--rounds 3]

Each request is one chat turn with one image never sent before (pseudo-random pixels: no KV reuse)
and `max_tokens` 1, so its latency is the time to its first token: the image preprocessed,
encoded by the projector and decoded into the KV with the text around it. At each concurrency C,
C clients send `--requests` requests each; images/s is requests over the wall time. Both servers
run with C sequences (llmservice `MAX_BATCH=C`, llama-server `-np C`), the same threads
(`BENCH_THREADS`) and context per sequence; the contenders alternate round by round and each
figure is the best of `--rounds`. Default model: the tiny random VLM of the tests
(tests/fixtures/tiny_vlm_gguf.py, a LLaVA "mlp" projector on 32x32 images), which shows the serving
cost around the encoder; a real VLM's encoder dominates on a CPU.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import free_port, llmservice, process
from bench.bench_generation import LLAMA_SERVER, N_CTX, THREADS

_serial = itertools.count()


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    model: str


@contextmanager
def ours(model: str, mmproj: str, parallel: int) -> Iterator[Server]:
    port = free_port()
    cmd, env = llmservice(
        {
            "PORT": str(port),
            "LIGHT_MODEL_PATH": model,
            "LIGHT_MMPROJ_PATH": mmproj,
            "LIGHT_N_CTX": str(N_CTX),
            "LIGHT_N_THREADS": str(THREADS),
            "LIGHT_MAX_BATCH": str(parallel),
            "LIGHT_MAX_QUEUE": "64",
            "ENABLE_CACHE": "false",
        }
    )
    url = f"http://127.0.0.1:{port}"
    with process(cmd, f"{url}/health", env, ready='"loaded"'):
        yield Server("llmservice", url, "light")


@contextmanager
def llama_server(model: str, mmproj: str, parallel: int) -> Iterator[Server]:
    port = free_port()
    cmd = [LLAMA_SERVER, "-m", model, "--mmproj", mmproj, "-c", str(N_CTX * parallel), "-np", str(parallel)]
    cmd += ["-t", str(THREADS), "-tb", str(THREADS), "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with process(cmd, f"{url}/health"):
        yield Server(f"llama-server -np {parallel}", url, "vlm")


def new_image(size: int = 64) -> str:
    """A PNG data URL of pixels no request has sent before."""
    from PIL import Image

    seed = next(_serial)
    pixels = bytes((seed * 7919 + i * 104729) % 251 for i in range(size * size * 3))
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def one(client: httpx.Client, server: Server) -> float:
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": new_image()}},
    ]
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 1,
        "temperature": 0,
    }
    start = time.perf_counter()
    res = client.post(f"{server.url}/v1/chat/completions", json=body)
    res.raise_for_status()
    return time.perf_counter() - start


def measure(server: Server, concurrency: int, requests: int) -> tuple[float, float]:
    """(images/s over the wall time, median seconds to the first token)."""
    with httpx.Client(timeout=300) as client:
        one(client, server)  # warm: the first image allocates the encoder's buffers
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(lambda _: one(client, server), range(concurrency * requests)))
        wall = time.perf_counter() - start
    return concurrency * requests / wall, statistics.median(latencies)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--mmproj")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.model:
        from tests.fixtures.tiny_vlm_gguf import build_tiny_vlm_gguf

        model, mmproj = build_tiny_vlm_gguf(Path("/tmp/bench-tiny-vlm"))
        args.model, args.mmproj = str(model), str(mmproj)
    print(f"model {Path(args.model).name} + {Path(args.mmproj).name}, {THREADS} threads")
    print("| concurrency | contender | images/s | TTFT median (ms) |")
    print("|---|---|---|---|")
    for c in (int(x) for x in args.concurrency.split(",")):
        best: dict[str, tuple[float, float]] = {}
        contenders = [ours, llama_server]
        for r in range(args.rounds):
            for start in contenders if r % 2 == 0 else contenders[::-1]:
                with start(args.model, args.mmproj, c) as server:
                    rate, ttft = measure(server, c, args.requests)
                name = "llmservice" if start is ours else "llama-server"
                old = best.get(name)
                best[name] = (max(rate, old[0]), min(ttft, old[1])) if old else (rate, ttft)
        for name, (rate, ttft) in best.items():
            print(f"| {c} | {name} | {rate:.2f} | {ttft * 1000:.1f} |")
        ours_rate, ours_ttft = best["llmservice"]
        peer_rate, peer_ttft = best["llama-server"]
        # Both ratios read "ours as a share of llama-server's": above 1 is better.
        print(f"| {c} | ratio, ours / llama-server | {ours_rate / peer_rate:.2f}x | {peer_ttft / ours_ttft:.2f}x |")


if __name__ == "__main__":
    main()
