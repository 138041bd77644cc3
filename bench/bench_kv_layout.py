"""Decode step time with N busy sequences: llama.cpp KV streams (one per sequence, the engine's
layout) against one unified KV pool (the layout before), in-process on the engine's batch loop.

    python bench/bench_kv_layout.py GGUF [--streams 16,32,64] [--length 1024] [--gaps]

Sequence i's prompt has length/8 + i * 7/8 * length / (N - 1) tokens (a spread of short and long
conversations); after every prompt is in, the mean of 40 decode steps is reported. `--gaps`:
2N sequences start and every other one leaves, so the busy streams are 1, 3, 5, ... (the engine
puts a throwaway token into each idle stream between them; see backends/llamacpp/batch.py).
One thread (`BENCH_THREADS`), repeat penalty off. The GGUF: e.g. ../shared/gpu/mkgguf.py --size tiny32k.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp

from backends.base import DecodeState, GenerationRequest
from backends.llamacpp.backend import LlamaCppBackend
from kernel.config import TierSettings


def step_time(model: str, n: int, length: int, unified: bool, gaps: bool) -> float:
    create = llama_cpp.llama_init_from_model

    def init(m: Any, cp: Any) -> Any:
        cp.kv_unified = unified
        return create(m, cp)

    llama_cpp.llama_init_from_model = init
    slots = 2 * n if gaps else n
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    tier = TierSettings(name="light", n_ctx=length + 256, n_batch=512, max_batch=slots, n_threads=threads)
    backend = LlamaCppBackend(tier, model)
    try:
        backend.load()
    finally:
        llama_cpp.llama_init_from_model = create
    batch = backend.open_batch()
    request = GenerationRequest(prompt="", max_tokens=100_000, temperature=0.0, repeat_penalty=1.0)
    for i in range(slots):
        size = length // 8 + (length - length // 8) * i // max(1, slots - 1)
        batch.add(i, DecodeState([1] + [300 + (i * 7 + j) % 30000 for j in range(size - 1)], request, 100_000))
    for _ in range(1000):  # every prompt in (a generous bound)
        batch.step()
        if all(s.fed == len(s.state.prompt) for s in batch._sequences.values()):
            break
    if gaps:
        for i in range(0, slots, 2):
            batch.remove(i)
    for _ in range(3):
        batch.step()
    steps = 40
    start = time.perf_counter()
    for _ in range(steps):
        batch.step()
    elapsed = (time.perf_counter() - start) / steps
    batch.close()
    backend.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--streams", default="16,32,64")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--gaps", action="store_true")
    a = ap.parse_args()
    for n in (int(s) for s in a.streams.split(",")):
        for unified in (False, True):
            dt = step_time(a.model, n, a.length, unified, a.gaps)
            layout = "unified" if unified else "streams"
            print(f"{n} sequences, {layout}: {dt * 1000:.1f} ms/step, {n / dt:.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
