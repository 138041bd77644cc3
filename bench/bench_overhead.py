"""Our own CPU per token of one stream, beside llama.cpp's step (issue 24's one-stream target).

    python bench/bench_overhead.py [--model GGUF] [--tokens 1000] [--rounds 3]

Two figures, each the median of `--rounds` greedy streams of `--tokens` tokens on the random
2-layer 32k-vocabulary GGUF (as bench_streams.py, 2 threads):
- model thread: the CPU time the model's thread spends outside `llama_decode` per token (the step's
  bookkeeping, sampling, detokenising, `DecodeState.add`), the engine driven in-process;
- event loop: the CPU time of the server's main thread (the event loop: the hop from the model's
  thread, the SSE chunk, uvicorn's write) per token of one streaming `/v1/completions`, read from
  /proc (Linux).
CPU time rather than tokens/s: on a shared 2-core machine tokens/s swings 5x with the neighbours'
load, these far less. On 2 cores the compute threads take both, so every microsecond here is taken
from llama.cpp's step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed one

from backends.base import GenerationRequest
from backends.llamacpp.backend import LlamaCppBackend
from bench._common import SAMPLING, concurrent_streams, cpu_seconds
from bench.bench_generation import THREADS, ours
from bench.bench_streams import TINY32K, ensure_model
from kernel.config import TierSettings

PROMPT = "Once upon a time"


def model_thread(model: str, tokens: int, rounds: int) -> list[float]:
    """µs of the model's thread's CPU outside llama_decode, per token, for each round."""
    inside = [0.0]
    decode = llama_cpp.llama_decode

    def timed(ctx: Any, batch: Any) -> int:
        start = time.thread_time()
        try:
            return int(decode(ctx, batch))
        finally:
            inside[0] += time.thread_time() - start

    llama_cpp.llama_decode = timed  # the batch looks it up on the module at each step
    backend = LlamaCppBackend(TierSettings(name="light", n_ctx=2048, n_threads=THREADS, max_batch=1), model)
    backend.load()
    out = []
    try:
        for _ in range(rounds + 1):  # the first allocates compute buffers: not counted
            request = GenerationRequest(prompt=PROMPT, max_tokens=tokens, temperature=0.0, repeat_penalty=1.0)
            state = backend.prepare(request)
            inside[0] = 0.0
            start = time.thread_time()
            n = sum(1 for _ in backend.stream_prepared(state, threading.Event()))
            out.append(1e6 * (time.thread_time() - start - inside[0]) / n)
    finally:
        backend.close()
        llama_cpp.llama_decode = decode
    return out[1:]


def event_loop(model: str, tokens: int, rounds: int) -> list[float]:
    """µs of the event loop's CPU per streamed token, for each round."""
    sampling = dict(SAMPLING, repeat_penalty=1.0)
    out = []
    with ours(model, 1, 0) as c:
        concurrent_streams(f"{c.url}/v1/completions", c.model, 1, 8, "warm", 0.0, sampling)
        for r in range(rounds):
            before = cpu_seconds(c.pid, c.pid)  # the main thread: uvicorn's event loop
            _, done = concurrent_streams(f"{c.url}/v1/completions", c.model, 1, tokens, f"r{r}", 0.0, sampling)
            out.append(1e6 * (cpu_seconds(c.pid, c.pid) - before) / max(1, sum(d.tokens for d in done)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(TINY32K), help="a GGUF path")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = ensure_model(args.model)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {os.getloadavg()}, {THREADS} threads")
    for name, measure in (("model thread", model_thread), ("event loop", event_loop)):
        runs = measure(model, args.tokens, args.rounds)
        shown = ", ".join(f"{x:.0f}" for x in runs)
        print(f"{name:13} {statistics.median(runs):6.1f} µs CPU per token (median of {shown})", flush=True)


if __name__ == "__main__":
    main()
