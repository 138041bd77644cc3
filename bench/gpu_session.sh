#!/usr/bin/env bash
# Issue 10's checks on a CUDA machine, run after ../shared/gpu/run.sh has built llama.cpp there
# (libllama for llama-cpp-python, /tmp/bb/bin/llama-server), installed the wheels and written the
# random 1.1B GGUF to /tmp/m.gguf. Device command (carry [".gpu"], after ../shared/gpu/prepare.sh):
#   CHECK="bash bench/gpu_session.sh" bash .gpu/run.sh
# 1. bench/gpu_check.py: that GGUF on the GPU beside a torch embedding tier (the SIGSEGV);
# 2. bench/bench_generation.py on it: llmservice vs llama-server, 1 / 4 / 16 streams of 256 tokens,
#    with py-spy's samples of llmservice at 16 streams in $OUT/profile.txt when py-spy is installed.
set -u
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-/tmp/m.gguf}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 LLAMA_SERVER=${LLAMA_SERVER:-/tmp/bb/bin/llama-server} BENCH_THREADS=${BENCH_THREADS:-4}
mkdir -p "$OUT"
"$PY" bench/gpu_check.py --model "$MODEL" --log "$OUT"
check=$?
profile=()
command -v py-spy > /dev/null && profile=(--profile "$OUT/profile.txt")
"$PY" bench/bench_generation.py --model "$MODEL" --gpu-layers -1 --tokens 256 --streams 1,4,16 --rounds 3 \
  --stagger 0.005 --no-llama-cpp-server "${profile[@]}"
exit $check
