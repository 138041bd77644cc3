"""MLX speculative decoding (SPECULATIVE=ngram and draft) vs plain decoding on an edit task, in-process.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \
        python bench/bench_speculative_mlx.py [--model FOLDER] [--draft-model FOLDER] [--rounds 2] \
            [--tokens 96] [--streams 1,4] [--modes off,ngram,draft]

The model is shown a text and asked to repeat it with one change (greedy, penalties off); the
batch (`MlxBackend.open_batch`, continuous batching on) decodes 1 and 4 such requests at once,
with speculation off, by prompt lookup (`ngram`) and by a draft model (`draft`; by default the
model itself, a correctness check with every draft kept), interleaved round by round. Reported:
decode tokens/s (all the batch's tokens over the time from its first token to its last), the
ratio to off, whether the texts are identical, and the drafted/accepted counts. Model: the Gemma 3 270M MLX folder that
`python -m tests.fixtures.gemma_mlx` builds. Gemma 3's sliding-window layers keep a rotating
cache that mlx-lm can trim only below its 512-token window, so the text is kept short enough
(prompt + answer < 512 tokens) for drafts to be verified at all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.base import GenerationRequest
from backends.mlx.backend import MlxBackend
from kernel.config import TierSettings

TEXT = (
    "Dear team, the quarterly review is moved to Thursday at ten in the large meeting room. "
    "Please bring the figures for the northern warehouses, the shipping costs of rail and road, "
    "and the draft schedule for the spring season. Lunch will be served after the meeting. "
    "If you cannot attend, send your notes to Maria before Wednesday evening. Thank you, Paul."
)
ASK = f"Repeat the following text exactly, changing only Thursday to Friday:\n\n{TEXT}"


def default_model() -> str:
    from tests.fixtures.gemma_mlx import CACHE_ROOT, VERSION

    return str(CACHE_ROOT / f"gemma-3-270m-mlx-f32-v{VERSION}")


def run(backend: MlxBackend, prompt: str, streams: int, tokens: int) -> tuple[float, list[str]]:
    """Decode tokens/s of `streams` copies of the request in one batch, and their texts."""
    backend.reset_prefix_cache()
    request = GenerationRequest(prompt=prompt, max_tokens=tokens, temperature=0.0, repeat_penalty=1.0)
    batch = backend.open_batch()
    texts = [""] * streams
    live, produced, first = set(range(streams)), 0, 0.0
    counts = [0] * streams
    try:
        for key in range(streams):
            batch.add(key, backend.prepare(request))
        while live:
            for key, token in batch.step():
                if token is None or isinstance(token, Exception):
                    live.discard(key)
                    continue
                if not produced:
                    first = time.perf_counter()
                produced += 1
                counts[key] += 1
                texts[key] += token.text
                if counts[key] == tokens:
                    live.discard(key)
        elapsed = time.perf_counter() - first
    finally:
        batch.close()
    return (produced - 1) / elapsed, texts


def forward_costs(backend: MlxBackend, rounds: int = 3) -> str:
    """Seconds of a 1-token and a 9-token forward and of 8 chained 1-token ones (a draft's k = 8),
    on a 90-token cache: what verifying and drafting cost against a plain step on this machine."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    model = backend._handle().model
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([list(range(100, 190))]), cache=cache))

    def forward(n: int) -> None:
        mx.eval(model(mx.array([[5] * n]), cache=cache))
        trim_prompt_cache(cache, n)

    def chained() -> None:
        y = mx.array(5)
        for _ in range(8):
            y = mx.argmax(model(y.reshape(1, 1), cache=cache)[0, -1])
        mx.eval(y)
        trim_prompt_cache(cache, 8)

    def best(run: Any) -> float:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    one, nine, eight = best(lambda: forward(1)), best(lambda: forward(9)), best(chained)
    return f"forward: 1 token {one:.3f} s, 9 tokens {nine:.3f} s, 8 chained 1-token {eight:.3f} s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--draft-model", default=None, help="SPECULATIVE=draft's model (default: --model)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--draft-tokens", type=int, default=8)
    parser.add_argument("--streams", default="1,4", help="batch sizes, comma-separated")
    parser.add_argument("--modes", default="off,ngram,draft", help="SPECULATIVE values (off first: the baseline)")
    parser.add_argument("--forward-costs", action="store_true", help="also time 1-, 9- and 8x1-token forwards")
    args = parser.parse_args()
    model = args.model or default_model()
    modes = args.modes.split(",")
    tier = {"name": "light", "n_ctx": 2048, "max_batch": 4, "prefix_cache_entries": 0}
    spec = {"draft_tokens": args.draft_tokens, "draft_model_path": args.draft_model or model}
    backends = {
        mode: MlxBackend(TierSettings(**tier, speculative=mode, **(spec if mode != "off" else {})), model)  # type: ignore[arg-type]
        for mode in modes
    }
    for backend in backends.values():
        backend.load()
    first = backends[modes[0]]
    prompt = first.render_chat([{"role": "user", "content": ASK}])
    print(f"model {model}; draft {spec['draft_model_path']}; prompt {len(first.encode(prompt))} tokens;")
    print(f"{args.tokens} tokens per stream; DRAFT_TOKENS={args.draft_tokens}")
    if args.forward_costs:
        print(forward_costs(first), flush=True)
    for streams in (int(n) for n in args.streams.split(",")):
        best = dict.fromkeys(modes, 0.0)
        texts: dict[str, list[str]] = {}
        for _ in range(args.rounds):
            for mode, backend in backends.items():
                rate, texts[mode] = run(backend, prompt, streams, args.tokens)
                best[mode] = max(best[mode], rate)
        row = ", ".join(
            f"{mode} {best[mode]:.2f} tok/s" + (f" x{best[mode] / best[modes[0]]:.2f}" if i else "")
            for i, mode in enumerate(modes)
        )
        same = all(texts[mode] == texts[modes[0]] for mode in modes)
        print(f"batch {streams}: {row}; identical text: {same}", flush=True)
    for mode, backend in backends.items():
        drafted, accepted = backend.spec_stats.drafted, backend.spec_stats.accepted
        if mode != "off":
            print(f"{mode}: drafted {drafted}, accepted {accepted} ({accepted / max(drafted, 1):.0%})")
    print("answer:", texts[modes[0]][0][:300].replace("\n", " "))


if __name__ == "__main__":
    main()
