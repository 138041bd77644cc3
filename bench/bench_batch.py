"""Throughput of N chat requests as one batch job vs the same requests sent one by one and concurrently.

    python bench/bench_batch.py [--requests 16] [--tokens 32] [--concurrency 4] [--batch-concurrency 2,4]

The default light tier (Gemma 3 270M GGUF on llama.cpp, MAX_BATCH 4), a server started per
BATCH_CONCURRENCY value; every request is a unique prompt (nothing replays from a cache), greedy,
`max_tokens` fixed, so all modes generate the same work. Timed from the first byte sent to the last
answer in hand: for the batch that is the upload, `batches.create`, polling every 100 ms until
`completed`, and downloading the output file. Modes run in turn, `--rounds` times; medians shown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openai import OpenAI

from bench._common import free_port, llmservice, process

PROMPT = "Request {i} of round {r}. Write a short poem about the sea."


def _body(i: int, r: int, tokens: int) -> dict[str, object]:
    return {
        "model": "light",
        "messages": [{"role": "user", "content": PROMPT.format(i=i, r=r)}],
        "max_tokens": tokens,
        "temperature": 0,
    }


def sequential(client: OpenAI, n: int, r: int, tokens: int) -> tuple[float, int]:
    start, generated = time.perf_counter(), 0
    for i in range(n):
        answer = client.chat.completions.create(**_body(i, r, tokens))  # type: ignore[call-overload]
        generated += answer.usage.completion_tokens
    return time.perf_counter() - start, generated


def concurrent(client: OpenAI, n: int, r: int, tokens: int, width: int) -> tuple[float, int]:
    start = time.perf_counter()
    with ThreadPoolExecutor(width) as pool:
        answers = list(pool.map(lambda i: client.chat.completions.create(**_body(i, r, tokens)), range(n)))
    return time.perf_counter() - start, sum(a.usage.completion_tokens for a in answers)


def batch(client: OpenAI, n: int, r: int, tokens: int) -> tuple[float, int]:
    lines = [
        {"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions", "body": _body(i, r, tokens)}
        for i in range(n)
    ]
    start = time.perf_counter()
    upload = client.files.create(file=("bench.jsonl", "\n".join(map(json.dumps, lines)).encode()), purpose="batch")
    job = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    while job.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.1)
        job = client.batches.retrieve(job.id)
    assert job.status == "completed" and job.output_file_id, job
    output = client.files.content(job.output_file_id).text.splitlines()
    elapsed = time.perf_counter() - start
    assert len(output) == n, (len(output), job.request_counts)
    return elapsed, sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"] for line in output)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4, help="client threads of the concurrent mode")
    parser.add_argument("--batch-concurrency", default="2,4", help="BATCH_CONCURRENCY values, a server each")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    n, tokens = args.requests, args.tokens
    results: dict[str, list[tuple[float, int]]] = {}
    print(
        f"machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}; "
        f"load average before: {os.getloadavg()[0]:.1f}"
    )
    for index, width in enumerate(int(v) for v in args.batch_concurrency.split(",")):
        port = str(free_port())
        batch_dir = tempfile.TemporaryDirectory(prefix="bench-batch-")  # removed when its server stops
        # LOAD_WAIT_SECONDS: the warm-up waits for the model instead of a 503 while it loads.
        settings = {
            "PORT": port,
            "BATCH_CONCURRENCY": str(width),
            "BATCH_DIR": batch_dir.name,
            "LOAD_WAIT_SECONDS": "120",
        }
        cmd, env = llmservice(settings)
        url = f"http://127.0.0.1:{port}"
        with batch_dir, process(cmd, f"{url}/health", env=env):
            client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
            client.chat.completions.create(**_body(-1, -1, 4))  # warm-up
            for r in range(args.rounds):
                tag = index * 1000 + r * 10  # a round number per mode: every prompt is new
                if index == 0:  # the baselines do not depend on BATCH_CONCURRENCY
                    results.setdefault("one by one", []).append(sequential(client, n, tag, tokens))
                    results.setdefault(f"concurrent ({args.concurrency} clients)", []).append(
                        concurrent(client, n, tag + 1, tokens, args.concurrency)
                    )
                results.setdefault(f"batch job (BATCH_CONCURRENCY={width})", []).append(
                    batch(client, n, tag + 2, tokens)
                )
    print(f"\n{n} chat requests, max_tokens {tokens}, temperature 0, unique prompts; medians of {args.rounds} rounds\n")
    print("| mode | wall s | requests/s | generated tokens/s |")
    print("|---|---|---|---|")
    for mode, runs in results.items():
        wall = statistics.median(s for s, _ in runs)
        made = statistics.median(t for _, t in runs)
        print(f"| {mode} | {wall:.2f} | {n / wall:.2f} | {made / wall:.1f} |")


if __name__ == "__main__":
    main()
