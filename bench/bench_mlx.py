"""The MLX engine through llmservice vs mlx-lm in-process and vs `python -m mlx_lm.server`.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \
        python bench/bench_mlx.py [--model FOLDER] [--rounds 3] [--tokens 48]

Model: the real Gemma 3 270M as an MLX folder (`python -m tests.fixtures.gemma_mlx` builds it into
~/.cache/llmservice-test-models/); without it, the tiny random test model (said so in the output).
Greedy, repetition penalty off, the same prompts everywhere:
  1. single stream: decode tokens/s and time to first token through our server (SSE) vs
     `mlx_lm.stream_generate` in this process, interleaved round by round with unique prompts;
  2. the same through `python -m mlx_lm.server` on the same folder (loopback);
  3. prefix cache: time to first token of a follow-up turn on a ~1,000-token conversation vs the
     first turn (ours and mlx_lm.server's, both keep prompt caches);
  4. aggregate tokens/s with 1, 2 and 4 concurrent streams (ours batches with BatchGenerator;
     mlx_lm.server too), plus ours with LIGHT_MAX_BATCH=1 (one request at a time) for scale.
MLX's Linux CPU build is slow (its reference BLAS, compute-bound, so batching gains nothing there);
Debian's OpenBLAS preloaded with OPENBLAS_NUM_THREADS=1 (MLX keeps its own threads busy) speeds up
prompt processing about tenfold and lets batched decoding scale. Compare ratios, not absolute speed.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    PROMPT,
    StreamTiming,
    concurrent_streams,
    free_port,
    llmservice,
    median,
    process,
    stream_completion,
    time_pieces,
)

N_CTX = 4096
FILLER = (
    "The committee reviewed the quarterly figures for the northern warehouses, compared the shipping "
    "costs of rail and road, and asked the planning team to prepare a schedule for the spring season. "
)


def default_model() -> tuple[str, str]:
    from tests.fixtures.gemma_mlx import CACHE_ROOT, VERSION

    gemma = CACHE_ROOT / f"gemma-3-270m-mlx-f32-v{VERSION}"
    if (gemma / "config.json").is_file():
        return str(gemma), "Gemma 3 270M (float32 MLX folder converted from the PyPI GGUF)"
    from tests.fixtures.tiny_mlx import build_tiny_mlx_model

    folder = tempfile.mkdtemp(prefix="bench-mlx-")
    atexit.register(shutil.rmtree, folder, True)
    tiny = build_tiny_mlx_model(Path(folder) / "tiny-mlx")
    return str(tiny), "the TINY random test model (no Gemma MLX folder found; build it for real numbers)"


def in_process(model: Any, tokenizer: Any, prompts: list[str], tokens: int) -> list[StreamTiming]:
    from mlx_lm import stream_generate

    out = []
    for prompt in prompts:
        start = time.monotonic()
        responses = stream_generate(model, tokenizer, prompt, max_tokens=tokens)
        out.append(time_pieces((response.text for response in responses), start))
    return out


def concurrent(url: str, model: str, streams: int, tokens: int, tag: str) -> float:
    """Aggregate generated tokens per second of `streams` simultaneous streams."""
    return concurrent_streams(url, model, streams, tokens, tag)[0]


def conversation(tag: str, turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": f"Session {tag}. You summarise meeting notes."}]
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"Notes, part {i + 1}: " + FILLER * 3},
            {"role": "assistant", "content": f"Part {i + 1}: figures reviewed, costs compared, schedule requested."},
        ]
    return messages


def chat_ttft(url: str, model: str, messages: list[dict[str, str]]) -> tuple[float, str]:
    """Time to first streamed content and the whole reply (max 8 tokens)."""
    body = {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True}
    start, first, parts = time.monotonic(), 0.0, []
    with httpx.stream("POST", url, json=body, timeout=900) as res:
        res.raise_for_status()
        for line in res.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices") or []:
                    if text := (choice.get("delta") or {}).get("content"):
                        first = first or time.monotonic()
                        parts.append(text)
    return (first or time.monotonic()) - start, "".join(parts)


def prefix_cache(url: str, model: str, turns: int, rounds: int) -> tuple[float, float, int]:
    """Median TTFT of a first turn (cold) and of the follow-up turn, and the prompt size."""
    firsts, seconds = [], []
    size = 0
    for r in range(rounds):
        messages = conversation(f"{model[:6]}-{r}-{time.time_ns()}", turns)
        messages.append({"role": "user", "content": "Summarise everything in one line."})
        ttft1, reply = chat_ttft(url, model, messages)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Shorter, please."}]
        ttft2, _ = chat_ttft(url, model, messages)
        firsts.append(ttft1)
        seconds.append(ttft2)
        if not size:
            body = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0}
            usage = httpx.post(url, json=body, timeout=900).json().get("usage") or {}
            size = int(usage.get("prompt_tokens", 0))
    return median(firsts), median(seconds), size


def single(url: str, model: str, prompt: str, tokens: int) -> StreamTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    return stream_completion(url, body)


def report(name: str, ours: list[StreamTiming], ref: list[StreamTiming], ref_name: str) -> None:
    o_tps, r_tps = median([t.decode_tps for t in ours]), median([t.decode_tps for t in ref])
    o_ttft, r_ttft = median([t.ttft for t in ours]), median([t.ttft for t in ref])
    print(f"{name} (median of {len(ours)} rounds)")
    print(f"  decode tok/s   llmservice {o_tps:7.2f}   {ref_name} {r_tps:7.2f}   ratio {o_tps / r_tps:.3f}")
    print(f"  TTFT s         llmservice {o_ttft:7.2f}   {ref_name} {r_ttft:7.2f}   ratio {o_ttft / r_ttft:.3f}")
    print(
        f"  tokens/stream  llmservice {median([t.tokens for t in ours]):.0f}   "
        f"{ref_name} {median([t.tokens for t in ref]):.0f}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="an MLX model folder (default: the cached Gemma MLX folder)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--turns", type=int, default=6, help="conversation turns (~160 tokens each)")
    args = parser.parse_args()
    folder, described = (args.model, args.model) if args.model else default_model()
    blas = "MLX's own CPU BLAS"
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        blas = f"OpenBLAS preloaded, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'default')}"
    print(f"model: {described}\n  {folder}\n  {blas}; load average {os.getloadavg()[0]:.1f}\n", flush=True)

    import mlx_lm

    model, tokenizer = mlx_lm.load(folder)
    ours_port, theirs_port = free_port(), free_port()
    base_env = {
        "LIGHT_MODEL_PATH": folder,
        "LIGHT_BACKEND": "mlx",
        "LIGHT_N_CTX": str(N_CTX),
        "LIGHT_TEMPERATURE": "0",
        "LIGHT_REPEAT_PENALTY": "1.0",
        "LIGHT_MAX_QUEUE": "64",
    }
    ours, theirs = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{theirs_port}"
    endpoints = {"llmservice": (ours, "light"), "mlx_lm.server": (theirs, "default_model")}
    cmd, env = llmservice({"PORT": str(ours_port), **base_env})
    server_cmd = [sys.executable, "-m", "mlx_lm.server", "--model", folder, "--host", "127.0.0.1"]
    server_cmd += ["--port", str(theirs_port), "--max-tokens", str(args.tokens), "--log-level", "WARNING"]
    # Both servers stay up (idle ones cost no CPU) so every measurement interleaves the contenders.
    with (
        process(cmd, f"{ours}/health", env, ready='"loaded"', timeout=600),
        process(server_cmd, f"{theirs}/health", timeout=600),
    ):
        in_process(model, tokenizer, ["Warm up."], 4)
        for url, name in endpoints.values():
            single(f"{url}/v1/completions", name, "Warm up.", 4)
        timings: dict[str, list[StreamTiming]] = {"in-process": [], **{k: [] for k in endpoints}}
        for r in range(args.rounds):
            prompt = PROMPT.format(i=f"s{r}")
            timings["in-process"] += in_process(model, tokenizer, [prompt], args.tokens)
            for key, (url, name) in endpoints.items():
                timings[key].append(single(f"{url}/v1/completions", name, prompt, args.tokens))
        del model, tokenizer
        cache = {
            k: prefix_cache(f"{url}/v1/chat/completions", name, args.turns, 2) for k, (url, name) in endpoints.items()
        }
        conc = {
            k: {
                n: max(concurrent(f"{url}/v1/completions", name, n, args.tokens, f"{k[0]}{r}") for r in range(2))
                for n in (1, 2, 4)
            }
            for k, (url, name) in endpoints.items()
        }

    cmd, env = llmservice({"PORT": str(ours_port), **base_env, "LIGHT_MAX_BATCH": "1"})
    with process(cmd, f"{ours}/health", env, ready='"loaded"', timeout=600):
        serial = {n: concurrent(f"{ours}/v1/completions", "light", n, args.tokens, "serial") for n in (1, 4)}

    report(
        "1. single stream vs mlx_lm.stream_generate in this process",
        timings["llmservice"],
        timings["in-process"],
        "in-process",
    )
    report(
        "2. single stream vs python -m mlx_lm.server", timings["llmservice"], timings["mlx_lm.server"], "mlx_lm.server"
    )
    print(f"3. prefix cache: ~{cache['llmservice'][2]}-token conversation, time to first token (median of 2)")
    for key, (first, second, _) in cache.items():
        print(f"  {key:14} first turn {first:7.2f} s   follow-up {second:6.2f} s   ratio {second / first:.3f}")
    print("\n4. aggregate tok/s with N concurrent streams (best of 2)")
    print("       llmservice (batched)   vs N=1   mlx_lm.server   llmservice MAX_BATCH=1")
    ours_conc, theirs_conc = conc["llmservice"], conc["mlx_lm.server"]
    for n in (1, 2, 4):
        s = f"{serial[n]:17.2f}" if n in serial else ""
        print(f"  N={n}  {ours_conc[n]:17.2f}   {ours_conc[n] / ours_conc[1]:6.2f}x  {theirs_conc[n]:14.2f}   {s}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
