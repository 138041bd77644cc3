"""Our own request path, before/after: two checkouts side by side in one run (issue 28).

    python bench/bench_request_path.py --before /work/main [--before-python PY] [--rounds 60] [--tokens 8]
        [--api completions|chat|agent] [--upstream llama|raw]

Starts, from each checkout (`--before`, and `--after` or this one), llmservice alone on the fake engine
(tests/fake_upstream.py, no time per token) and a front with a remote light tier over one shared
llama-server (the tiny32k GGUF, `-t 1`); then sends one streamed completion at a time, rotating
over llama-server direct and the four servers so load on the box hits all alike. Prints median
time to first token and decode tokens/s of each, and the hop (front minus direct). `--upstream raw`: the
fronts over bench/raw_upstream.py instead (no model: what is left of the hop is the fronts' own cost)
and no fake-engine servers; `--api chat`/`agent`: streamed chat requests (agent: each carries a 130 KB
coding-agent conversation, as Codex CLI and Claude Code send every turn). `--before-python` runs the
before checkout's servers on another interpreter (e.g. a venv without httptools/uvloop: uvicorn's h11
and asyncio), the after checkout's on this one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import PROMPT, StreamTiming, stream_completion
from bench.bench_remote import fake_engine, front, upstream
from bench.bench_request_stages import agent_conversation, raw_upstream
from bench.bench_streams import TINY32K, ensure_model

HERE = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, help="the checkout to compare against (e.g. /work/main)")
    parser.add_argument("--after", default=str(HERE), help="the checkout compared (this one by default)")
    parser.add_argument("--before-python", default=sys.executable, help="the before checkout's interpreter")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--model", default=str(TINY32K))
    parser.add_argument(
        "--api",
        choices=["completions", "chat", "agent"],
        default="completions",
        help="agent: chat requests carrying a 130 KB coding-agent conversation (use with --upstream raw)",
    )
    parser.add_argument(
        "--upstream",
        choices=["llama", "raw"],
        default="llama",
        help="raw: bench/raw_upstream.py (no model, no fake-engine servers): the fronts' own cost alone",
    )
    args = parser.parse_args()
    roots = {
        "before": (Path(args.before).resolve(), args.before_python),
        "after": (Path(args.after).resolve(), sys.executable),
    }
    with ExitStack() as stack:
        if args.upstream == "raw":
            direct, upstream_name = stack.enter_context(raw_upstream()), "raw upstream"
        else:
            direct, upstream_name = stack.enter_context(upstream(ensure_model(args.model), 2, 1))[0], "llama-server"
        targets = {f"{upstream_name} direct": direct}
        for name, (root, python) in roots.items():
            if args.upstream == "llama":
                targets[f"fake engine, {name}"] = stack.enter_context(fake_engine(root, python))
            url = stack.enter_context(front([direct], root=root, python=python))
            targets[f"front over {upstream_name}, {name}"] = f"{url}/v1"
        history = agent_conversation() if args.api == "agent" else []
        path = "/completions" if args.api == "completions" else "/chat/completions"
        timings: dict[str, list[StreamTiming]] = {name: [] for name in targets}
        names = list(targets)
        for i in range(args.rounds + 5):
            for k in range(len(names)):  # rotate who goes first, so drift in load hits all alike
                name = names[(i + k) % len(names)]
                prompt = PROMPT.format(i=f"{i}-{k}")
                asked = {"prompt": prompt} if path == "/completions" else {"messages": [*history, _user(prompt)]}
                body = {"model": "light", "max_tokens": args.tokens, "temperature": 0.5, **asked}
                timing = stream_completion(f"{targets[name]}{path}", body)
                if i >= 5:  # the first rounds warm up connections and caches
                    timings[name].append(timing)
    load = os.getloadavg()[0]
    print(f"{args.api}, {args.rounds} rounds, {args.tokens} tokens, load average {load:.1f}; medians:")
    med = {name: statistics.median(t.ttft * 1000 for t in v) for name, v in timings.items()}
    for name, value in med.items():
        tps = statistics.median(t.decode_tps for t in timings[name])
        print(f"  {name:34s} TTFT {value:6.2f} ms   decode {tps:8.1f} tok/s")
    for name in roots:
        print(f"  hop ({name}): {med[f'front over {upstream_name}, {name}'] - med[f'{upstream_name} direct']:+.2f} ms")


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


if __name__ == "__main__":
    main()
