"""Real-size LLaVA-1.5 files with random weights, for bench/bench_vision.py: speed does not depend
on weight values, and no real VLM can be downloaded here (issue 26, item 6).

    python bench/make_realsize_vlm.py [--out /tmp/bench-realsize-vlm]
    BENCH_THREADS=2 python bench/bench_vision.py --model OUT/realsize-vlm.gguf --mmproj OUT/mmproj-realsize-vlm.gguf

The projector is LLaVA-1.5's at its real size, in f16 (~0.6 GB): CLIP ViT-L/14 at 336 px (24 layers,
hidden 1024, 16 heads, intermediate 4096, patches of 14, 577 positions with the class token, a
pre-layernorm; llama.cpp runs 23 of the 24 layers, LLaVA's second-to-last feature layer), then the
`mlp` projector 1024 -> 1024 -> 1024: an image is 576 tokens. The LLM is a small llama whose width
matches (hidden 1024, intermediate 2816, 16 heads, 4 layers, the byte vocabulary of the tests, f16;
~60 GFLOP for the image's prefill against the encoder's ~350): a 7B LLM (n_embd 4096) would be far
too slow on this CPU, and only its prefill of the 576 image tokens would grow, the same work for
both servers (a 2048-wide 4-layer llama took 17-26 s per image at 2 threads here). Written with the
tests' writer (tests/fixtures/tiny_vlm_gguf.py), never into the repository."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.tiny_vlm_gguf import VlmShape, build_tiny_vlm_gguf

LLAVA_15_CLIP_L = VlmShape(
    embd=1024,
    ffn=2816,
    heads=16,
    layers=4,
    v_embd=1024,
    v_ffn=4096,
    v_heads=16,
    v_layers=24,
    v_hidden=1024,
    image_size=336,
    patch=14,
    class_token=True,
    float16=True,
    name="realsize-vlm",
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/bench-realsize-vlm")
    args = parser.parse_args()
    start = time.perf_counter()
    model, mmproj = build_tiny_vlm_gguf(Path(args.out), shape=LLAVA_15_CLIP_L)
    for path in (model, mmproj):
        print(f"{path} {path.stat().st_size / 2**20:.0f} MiB")
    print(f"written in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
