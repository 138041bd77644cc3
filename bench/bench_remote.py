"""Remote tiers (issue 28): what the hop through llmservice costs, and a pool losing an upstream.

    python bench/bench_remote.py [--model GGUF] [--rounds 10] [--tokens 128] [--parts hop,kill,scale]

hop:   one llama-server (`-np 2`); one stream at a time, alternately straight to llama-server and
       through llmservice with `LIGHT_BACKEND=remote` in front of it (same prompt shape, each one
       unique, greedy): median time to first token and median decode tokens/s of each. Targets:
       TTFT +<= 3 ms, decode >= 0.97x.
kill:  two llama-servers behind one pool; 16 streams staggered 50 ms, the first upstream killed
       (SIGKILL) 1 s in, 16 more streams after it. Counts streams that failed before their first
       byte (target 0) and streams cut after it (each must end with an error event, then [DONE]).
scale: 8 concurrent streams through a pool of one llama-server, then of two, each server on one
       thread (`-t 1`) and pinned to a core: aggregate tokens/s, two over one (target >= 1.8x; needs
       two idle cores), beside the same 8 streams straight to the servers (`direct`, split evenly):
       ours/direct says what the front costs, direct two-over-one what the box can give.
stack: what one llmservice request costs on its own, to read the hop's TTFT against: time to first
       token straight to llmservice on the fake engine (tests/fake_upstream.py), and through a
       remote tier in front of it (medians of 25, after 5 to warm up).

Default model: the random 2-layer 32k-vocabulary GGUF (/tmp/tiny32k.gguf, see bench_streams.py),
whose decode step is cheap enough that the serving layer's cost per token shows.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import PROMPT, ROOT, SAMPLING, cpu_seconds, free_port, llmservice, process, stream_completion
from bench.bench_generation import LLAMA_SERVER, N_CTX
from bench.bench_streams import TINY32K, ensure_model


@contextmanager
def upstream(model: str, parallel: int, threads: int, cpu: int | None = None) -> Iterator[tuple[str, int]]:
    """A llama-server (pinned to core `cpu` when given): its base URL (ending /v1) and its pid."""
    port = free_port()
    cmd = ["taskset", "-c", str(cpu)] if cpu is not None else []
    cmd += [LLAMA_SERVER, "-m", model, "-c", str(N_CTX * parallel), "-np", str(parallel), "-ngl", "0"]
    cmd += ["-t", str(threads), "-tb", str(threads), "--host", "127.0.0.1", "--port", str(port)]
    with process(cmd, f"http://127.0.0.1:{port}/health") as proc:
        yield f"http://127.0.0.1:{port}/v1", proc.pid


@contextmanager
def front(
    urls: list[str], pids: list[int] | None = None, root: Path = ROOT, python: str = sys.executable
) -> Iterator[str]:
    """llmservice from checkout `root` on interpreter `python` with a remote light tier over `urls`:
    its base URL (its pid appended to `pids`)."""
    port = free_port()
    env = {"PORT": str(port), "LIGHT_BACKEND": "remote", "LIGHT_REMOTE_URLS": ",".join(urls), "LIGHT_MAX_QUEUE": "64"}
    cmd, full = llmservice({**env, "PYTHONPATH": str(root)})
    url = f"http://127.0.0.1:{port}"
    with process([python, *cmd[1:]], f"{url}/health", full, ready='"loaded"') as proc:
        if pids is not None:
            pids.append(proc.pid)
        yield url


@contextmanager
def fake_engine(root: Path = ROOT, python: str = sys.executable) -> Iterator[str]:
    """llmservice on the fake engine (tests/fake_upstream.py, no time per token) from checkout `root`:
    its base URL (ending /v1)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root)}
    base = f"http://127.0.0.1:{port}/v1"
    with process([python, str(root / "tests" / "fake_upstream.py"), str(port)], f"{base}/models", env, '"loaded"'):
        yield base


def body(tag: str, tokens: int) -> dict[str, object]:
    return {
        "model": "light",
        "prompt": PROMPT.format(i=tag),
        "max_tokens": tokens,
        **SAMPLING,
        "stream_options": {"include_usage": True},
    }


def hop(model: str, rounds: int, tokens: int) -> None:
    with upstream(model, 2, int(os.environ.get("BENCH_THREADS", "2"))) as (base, _), front([base]) as ours:
        direct_url, ours_url = f"{base}/completions", f"{ours}/v1/completions"
        for warm in range(2):
            stream_completion(direct_url, body(f"warm-d{warm}", tokens))
            stream_completion(ours_url, body(f"warm-o{warm}", tokens))
        direct, through = [], []
        for i in range(rounds):  # alternate, flipping who goes first, so noise hits both alike
            pair = [("d", direct_url, direct), ("o", ours_url, through)]
            for tag, url, out in pair if i % 2 == 0 else pair[::-1]:
                out.append(stream_completion(url, body(f"hop-{tag}{i}", tokens)))
    d_ttft = statistics.median(r.ttft for r in direct) * 1000
    o_ttft = statistics.median(r.ttft for r in through) * 1000
    d_tps = statistics.median(r.decode_tps for r in direct)
    o_tps = statistics.median(r.decode_tps for r in through)
    print(f"hop, {rounds} rounds of {tokens} tokens, medians:")
    print(f"  llama-server direct:       TTFT {d_ttft:7.2f} ms   decode {d_tps:7.1f} tok/s")
    print(f"  through llmservice remote: TTFT {o_ttft:7.2f} ms   decode {o_tps:7.1f} tok/s")
    # A later first token shortens the window decode tokens/s is measured over: the whole stream's time tells too.
    d_all = statistics.median(r.ttft + r.decode_seconds for r in direct) * 1000
    o_all = statistics.median(r.ttft + r.decode_seconds for r in through) * 1000
    print(f"  hop cost: TTFT {o_ttft - d_ttft:+.2f} ms, decode {o_tps / d_tps:.3f}x")
    print(f"  whole stream (request to last token): {d_all:.1f} -> {o_all:.1f} ms ({d_all / o_all:.3f}x the speed)")


@dataclass
class Outcome:
    content: bool = False  # a first byte of content reached the client
    error_event: bool = False
    done: bool = False  # ended with [DONE]
    status: int = 0


def watched(url: str, payload: dict[str, object]) -> Outcome:
    out = Outcome()
    try:
        with httpx.stream("POST", url, json={**payload, "stream": True}, timeout=120) as res:
            out.status = res.status_code
            if res.status_code != 200:
                res.read()
                return out
            for line in res.iter_lines():
                if line == "data: [DONE]":
                    out.done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    out.error_event |= "error" in event
                    out.content |= any(c.get("text") for c in event.get("choices") or [])
    except httpx.HTTPError:
        pass
    return out


def kill(model: str, tokens: int) -> None:
    with ExitStack() as stack:
        ups = [stack.enter_context(upstream(model, 16, 1)) for _ in range(2)]
        ours = stack.enter_context(front([u for u, _ in ups]))
        url = f"{ours}/v1/completions"
        results: list[Outcome] = []
        lock = threading.Lock()

        def run(i: int) -> None:
            outcome = watched(url, body(f"kill-{i}", tokens))
            with lock:
                results.append(outcome)

        threads = []
        for i in range(32):
            if i == 16:
                time.sleep(1.0 - 16 * 0.05)
                os.kill(ups[0][1], signal.SIGKILL)
            threads.append(threading.Thread(target=run, args=(i,)))
            threads[-1].start()
            time.sleep(0.05)
        for t in threads:
            t.join()
    before = sum(1 for r in results if not r.content)
    cut = [r for r in results if r.content and r.error_event]
    clean = sum(1 for r in cut if r.done)
    print(f"kill: 32 streams of {tokens} tokens over 2 upstreams, one killed 1 s in")
    print(f"  failed before their first byte: {before}")
    print(f"  cut after it: {len(cut)} ({clean} ended with an error event then [DONE])")
    print(f"  completed: {sum(1 for r in results if r.content and not r.error_event and r.done)}")


def scale(model: str, tokens: int, rounds: int) -> None:
    rates = [aggregate(model, count, tokens, rounds) for count in (1, 2)]
    (d1, o1), (d2, o2) = rates
    print(f"  two over one: through llmservice {o2 / o1:.2f}x, direct {d2 / d1:.2f}x")
    print(f"  ours/direct: one upstream {o1 / d1:.3f}, two {o2 / d2:.3f}")


def eight_streams(urls: list[str], tag: str, tokens: int) -> tuple[float, list[int]]:
    """8 concurrent streams, the i-th to `urls[i % len(urls)]`: tokens/s in all, and each stream's tokens."""
    results: list[int] = [0] * 8

    def run(i: int) -> None:
        results[i] = stream_completion(urls[i % len(urls)], body(f"{tag}-{i}", tokens)).tokens

    start = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results) / (time.monotonic() - start), results


def aggregate(model: str, count: int, tokens: int, rounds: int) -> tuple[float, float]:
    """8 concurrent streams to `count` one-thread llama-servers: tokens/s in all straight to them
    (`direct`: the streams split evenly, no front) and through a pool of them (ours), medians of
    `rounds`."""
    with ExitStack() as stack:
        # Each upstream on a core of its own, as the target says; the front and the client float.
        ups = [stack.enter_context(upstream(model, 8, 1, i % (os.cpu_count() or 1))) for i in range(count)]
        pids: list[int] = []
        base = stack.enter_context(front([u for u, _ in ups], pids))
        direct_urls = [f"{u}/completions" for u, _ in ups]
        for url in direct_urls:
            stream_completion(url, body(f"warm-d{count}-{url}", 16))
        stream_completion(f"{base}/v1/completions", body(f"warm-{count}", tokens))
        # This box's speed drifts by tens of percent within a minute: rounds alternate who goes first,
        # and each side's median counts.
        rates: dict[str, list[float]] = {"direct": [], "ours": []}
        front_cpu: list[float] = []  # the front's CPU seconds per 1000 tokens relayed, each round
        for r in range(rounds):
            sides = [("direct", direct_urls), ("ours", [f"{base}/v1/completions"])]
            for side, urls in sides if r % 2 == 0 else sides[::-1]:
                before = cpu_seconds(pids[0])
                rate, streamed = eight_streams(urls, f"{side}{count}-{r}", tokens)
                rates[side].append(rate)
                if side == "ours":
                    front_cpu.append((cpu_seconds(pids[0]) - before) * 1000 / max(1, sum(streamed)))
        direct, ours = statistics.median(rates["direct"]), statistics.median(rates["ours"])
        per_token = statistics.median(front_cpu)
        views = httpx.get(f"{base}/v1/models").json()["data"][0]["upstreams"]
        spread = [u["requests"] for u in views]
        ejections = [u["ejections"] for u in views]
    # On a box with no core to spare the front's CPU comes out of the upstreams' cores: say how much.
    print(
        f"scale: {count} upstream(s), 8 streams: direct {direct:.1f} tok/s, through llmservice {ours:.1f} tok/s"
        f" ({ours / direct:.3f}x; requests per upstream, warm-up included: {spread}, ejections {ejections});"
        f" the front used {per_token:.3f} CPU s per 1000 tokens ({per_token * ours / 1000:.2f} of a core)"
    )
    return direct, ours


def stack() -> None:
    with fake_engine() as base, front([base]) as ours:
        direct, through = [], []
        for i in range(30):
            payload = {"model": "light", "prompt": PROMPT.format(i=i), "max_tokens": 8, "temperature": 0.5}
            direct.append(stream_completion(f"{base}/completions", payload).ttft)
            payload["prompt"] = PROMPT.format(i=f"front-{i}")
            through.append(stream_completion(f"{ours}/v1/completions", payload).ttft)
    d, o = (statistics.median(v[5:]) * 1000 for v in (direct, through))
    print(f"stack: llmservice on the fake engine TTFT {d:.2f} ms; through a remote tier in front {o:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(TINY32K))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--parts", default="hop,kill,scale")
    args = parser.parse_args()
    model = ensure_model(args.model)
    parts = args.parts.split(",")
    if "hop" in parts:
        hop(model, args.rounds, args.tokens)
    if "kill" in parts:
        kill(model, 4 * args.tokens)
    if "scale" in parts:
        scale(model, args.tokens, min(args.rounds, 5))
    if "stack" in parts:
        stack()


if __name__ == "__main__":
    main()
