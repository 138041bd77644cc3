"""Many concurrent streams: llmservice vs llama-server at 1, 16, 32 and 64 streams (issue 24).

    python bench/bench_streams.py [--model GGUF] [--streams 1,16,32,64] [--tokens 128] [--rounds 5]
        [--repeat-penalty tier,1.0] [--gpu-layers N] [--stagger 0.005] [--logs DIR] [--profile FILE]

For each stream count N, both servers start sized to it (llmservice `MAX_BATCH=N`, llama-server
`-np N -c N*N_CTX`: N_CTX tokens per sequence for both), with the same threads (`BENCH_THREADS`) and
GPU offload. Then N greedy streams arrive `--stagger` s apart, contender after contender, their
order flipped every run so a noisy neighbour hits both alike; each figure is the best of
`--rounds` (aggregate tokens/s over the wall time, the worst stream's first-token time in that
run). At N=1 the stream's own decode tokens/s and time to first token are shown too.

Sampling: temperature 0 with top_k 40 / top_p 0.95 / min_p 0.05 sent to both, and each
`--repeat-penalty` in turn: `tier` leaves the field out for llmservice, so the tier's default
applies as a user gets it, and sends that same value to llama-server (whose own default is 1.0);
a number is sent to both.

Default model: the random 2-layer 32k-vocabulary GGUF (/tmp/tiny32k.gguf, written by
../shared/gpu/mkgguf.py --size tiny32k when missing): on a CPU its decode step costs what a 1B
model's does on an H100, so the serving layer's cost per token shows. llama-server as in
bench_generation.py (`LLAMA_SERVER`). The servers' output goes to `--logs` (a server that dies
is reported with its log's tail). On a GPU machine: bench/gpu_session.sh.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, SAMPLING, concurrent_streams
from bench.bench_generation import LLAMA_SERVER, N_CTX, THREADS, Contender, llama_server, ours, profiled

TINY32K = Path("/tmp/tiny32k.gguf")
MKGGUF = ROOT.parent / "shared" / "gpu" / "mkgguf.py"


@dataclass(frozen=True)
class Penalty:
    """One sampling setting: what llmservice is sent (None: its tier default) and llama-server."""

    label: str
    ours: float | None
    server: float


@dataclass(frozen=True)
class Run:
    tps: float  # aggregate tokens/s over the wall time
    worst_ttft: float  # s
    decode_tps: float  # median of the streams' own decode rates
    ttft: float  # median first-token time, s
    tokens: float  # mean completion tokens per stream
    failed: int


def penalties(spec: str) -> list[Penalty]:
    from kernel.config import Sampling

    tier = Sampling().repeat_penalty  # the built-in default: the tiny GGUF's card sets none
    out: list[Penalty] = []
    for item in spec.split(","):
        if item == "tier":
            out.append(Penalty(f"tier default ({tier:g})", None, tier))
        else:
            out.append(Penalty(f"{float(item):g} sent", float(item), float(item)))
    return out


def ensure_model(path: str) -> str:
    if path == str(TINY32K) and not TINY32K.is_file():
        subprocess.run([sys.executable, str(MKGGUF), str(TINY32K), "--size", "tiny32k"], check=True)
    return path


def measure(c: Contender, n: int, tokens: int, tag: str, stagger: float, p: Penalty) -> Run:
    value = p.ours if c.name == "llmservice" else p.server
    sampling = {k: v for k, v in SAMPLING.items() if k != "repeat_penalty"}
    if value is not None:
        sampling["repeat_penalty"] = value
    tps, done = concurrent_streams(f"{c.url}/v1/completions", c.model, n, tokens, tag, stagger, sampling)
    if not done:
        return Run(0.0, 0.0, 0.0, 0.0, 0.0, n)
    return Run(
        tps,
        max(d.ttft for d in done),
        statistics.median(d.decode_tps for d in done),
        statistics.median(d.ttft for d in done),
        statistics.fmean(d.tokens for d in done),
        n - len(done),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(TINY32K), help="a GGUF path")
    parser.add_argument("--streams", default="1,16,32,64")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat-penalty", default="tier,1.0", help="comma list: tier or numbers")
    parser.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded to the GPU, -1 = all")
    parser.add_argument("--stagger", type=float, default=0.005, help="seconds between the streams' arrivals")
    parser.add_argument("--logs", default="/tmp/bench-streams-logs", help="folder for the servers' output")
    parser.add_argument("--profile", help="py-spy's samples of llmservice at the most streams go to this file")
    args = parser.parse_args()
    if not Path(LLAMA_SERVER).is_file():
        sys.exit(f"llama-server not found at {LLAMA_SERVER} (set LLAMA_SERVER; docs/benchmarks.md has the build)")
    counts = [int(n) for n in args.streams.split(",")]
    modes = penalties(args.repeat_penalty)
    model = ensure_model(args.model)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, load average at start {os.getloadavg()}")
    print(f"model {model}, {args.gpu_layers} GPU layers, {THREADS} threads, n_ctx {N_CTX} per sequence")
    print(f"{args.tokens} tokens per stream, {SAMPLING} with repeat_penalty: {', '.join(m.label for m in modes)}\n")

    best: dict[tuple[int, str, str], Run] = {}  # (N, penalty, contender) -> best run
    for n in counts:
        with ExitStack() as stack:
            contenders = [
                stack.enter_context(ours(model, n, args.gpu_layers, logs / f"llmservice-{n}.log")),
                stack.enter_context(llama_server(model, n, args.gpu_layers, logs / f"llama-server-{n}.log")),
            ]
            for c in contenders:  # first requests allocate compute buffers: keep them out of the figures
                measure(c, n, 8, f"warm-{c.name}", args.stagger, modes[0])
            for r in range(args.rounds):
                for i, p in enumerate(modes):
                    order = contenders if (r + i) % 2 == 0 else contenders[::-1]
                    for c in order:
                        spy = args.profile if c is contenders[0] and n == max(counts) and r == i == 0 else None
                        with profiled(c.pid, spy):
                            run = measure(c, n, args.tokens, f"{c.name}-{r}-{i}", args.stagger, p)
                        failed = f", {run.failed} FAILED" if run.failed else ""
                        print(
                            f"  N={n:<3} {p.label:22} {c.name:20} {run.tps:8.1f} tok/s, "
                            f"worst TTFT {run.worst_ttft:5.2f}s, {run.tokens:.0f} tokens/stream{failed}",
                            flush=True,
                        )
                        key = (n, p.label, c.name.split()[0])
                        if key not in best or run.tps > best[key].tps:
                            best[key] = run

    elapsed = time.monotonic() - started
    print(f"\nbest of {args.rounds} runs; load average at the end {os.getloadavg()}; {elapsed:.0f} s in all")
    for p in modes:
        print(f"\nrepeat_penalty {p.label}")
        print(
            "| streams | llmservice tok/s (worst TTFT) | llama-server tok/s (worst TTFT) | llmservice / llama-server |"
        )
        print("|---|---|---|---|")
        for n in counts:
            a, b = best[(n, p.label, "llmservice")], best[(n, p.label, "llama-server")]
            ratio = f"**{a.tps / b.tps:.3f}x**" if b.tps else "-"
            cells = [f"{x.tps:.1f} ({x.worst_ttft:.2f} s)" for x in (a, b)]
            if n == 1 and b.decode_tps:  # the stream's own decode rate and first token, beside the aggregate
                ratio += f" (decode {a.decode_tps / b.decode_tps:.3f}x, TTFT {1e3 * (a.ttft - b.ttft):+.1f} ms)"
                cells = [f"{x.tps:.1f} ({x.worst_ttft:.2f} s; decode {x.decode_tps:.1f})" for x in (a, b)]
            print(f"| {n} | {cells[0]} | {cells[1]} | {ratio} |")


if __name__ == "__main__":
    main()
