"""Reranker engines in-process, on one model: pairs scored per second and the largest logit difference.

    python bench/bench_rerank_engines.py [--shape base|minilm] [--seconds 4] [--reps 3]

The model is built at run time (no download), random weights, one logit:
- `base`: an XLM-R sequence classifier of bge-reranker-base's shape (12 layers, hidden 768) with the
  test suite's small XLM-R tokenizer (pairs of 28-107 tokens here);
- `minilm`: bench_rerank.py's BERT cross-encoder (ms-marco-MiniLM-L-6-v2's shape, its tokenizer).
Engines: `flag` (FlagEmbedding's FlagReranker), `cross_encoder` on torch and on onnxruntime, and
the cross-encoder with every layer in full (`full`, without rerankers.first_token) on both. Calls of
32 pairs (one query each), interleaved, median of `--reps`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_embeddings import OFFLINE, sentences
from bench.bench_rerank import build_minilm_cross_encoder


def build_base_xlmr(dest: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForSequenceClassification

    from tests.fixtures.tiny_models import _xlmr_tokenizer

    dest.mkdir(parents=True, exist_ok=True)
    _xlmr_tokenizer(dest)
    torch.manual_seed(0)
    config = XLMRobertaConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(str(dest))),
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=1,
    )
    XLMRobertaForSequenceClassification(config).save_pretrained(str(dest))
    return dest


def engines(folder: str) -> dict[str, Any]:
    import rerankers.first_token as first_token
    from kernel.config import TierSettings
    from rerankers.factory import create_reranker

    out: dict[str, Any] = {}
    for name, engine, runtime in (
        ("flag", "flag", "torch"),
        ("cross_encoder torch", "cross_encoder", "torch"),
        ("cross_encoder onnx", "cross_encoder", "onnx"),
    ):
        out[name] = create_reranker(TierSettings(name="reranker", engine=engine, runtime=runtime), folder)
        out[name].load()
    own = first_token.first_token_classifier
    first_token.first_token_classifier = lambda model, probe: None  # every layer in full
    try:
        for runtime in ("torch", "onnx"):
            tier = TierSettings(name="reranker", engine="cross_encoder", runtime=runtime)
            out[f"full {runtime}"] = create_reranker(tier, folder)
            out[f"full {runtime}"].load()
    finally:
        first_token.first_token_classifier = own
    return out


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=("base", "minilm"), default="base")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(OFFLINE)
    docs = sentences(512, seed=3)
    queries = [" ".join(doc.split()[:5]) for doc in sentences(16, seed=4)]
    calls = [[(queries[i], d) for d in docs[i * 32 : (i + 1) * 32]] for i in range(16)]
    with tempfile.TemporaryDirectory(prefix="bench-rerank-engines-") as tmp:
        build = build_base_xlmr if args.shape == "base" else build_minilm_cross_encoder
        folder = str(build(Path(tmp) / args.shape))
        loaded = engines(folder)
        reference = np.array(loaded["flag"].score_pairs(calls[0]))
        rates: dict[str, list[float]] = {name: [] for name in loaded}
        for _ in range(args.reps):
            for name, engine in loaded.items():
                done, i, start = 0, 0, time.perf_counter()
                while time.perf_counter() - start < args.seconds:
                    engine.score_pairs(calls[i % len(calls)])
                    done, i = done + 32, i + 1
                rates[name].append(done / (time.perf_counter() - start))
        print(f"\n{args.shape}: pairs scored/s, calls of 32 pairs, median of {args.reps} x {args.seconds:g} s")
        print("| engine | pairs/s | vs flag | max logit difference vs flag |")
        print("|---|---|---|---|")
        flag = statistics.median(rates["flag"])
        for name, engine in loaded.items():
            rate = statistics.median(rates[name])
            diff = float(np.abs(np.array(engine.score_pairs(calls[0])) - reference).max())
            print(f"| {name} | {rate:.1f} | {rate / flag:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
