#!/usr/bin/env bash
# Issue 24's GPU check, run after ../shared/gpu/run.sh has built llama.cpp there (libllama for
# llama-cpp-python, /tmp/bb/bin/llama-server), installed the wheels and written the random 1.1B GGUF
# to /tmp/m.gguf. Device command (carry [".gpu"], after ../shared/gpu/prepare.sh here):
#   CHECK="bash bench/gpu_session.sh" bash .gpu/run.sh
# 1. bench/bench_streams.py: llmservice vs llama-server at 1, 16 and 64 streams of 256 tokens, the
#    tier's default repeat_penalty and 1.0, best of 2 (about 3 minutes); py-spy's samples of
#    llmservice at 64 streams in $OUT/profile.txt when py-spy is installed; the servers' logs in
#    $OUT/logs.tgz; the tables in $OUT/streams.txt.
# 2. bench/gpu_check.py: that GGUF on the GPU beside a torch embedding tier (issue 10's SIGSEGV).
set -u
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-/tmp/m.gguf}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 LLAMA_SERVER=${LLAMA_SERVER:-/tmp/bb/bin/llama-server} BENCH_THREADS=${BENCH_THREADS:-4}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
profile=()
command -v py-spy > /dev/null && profile=(--profile "$OUT/profile.txt")
"$PY" bench/bench_streams.py --model "$MODEL" --gpu-layers -1 --streams "${STREAMS:-1,16,64}" --tokens 256 \
  --rounds "${ROUNDS:-2}" --logs /tmp/bench-logs "${profile[@]}" 2>&1 | tee "$OUT/streams.txt"
bench=${PIPESTATUS[0]}
tar czf "$OUT/logs.tgz" -C /tmp bench-logs
"$PY" bench/gpu_check.py --model "$MODEL" --log "$OUT"
check=$?
exit $(( bench || check ))
