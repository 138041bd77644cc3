#!/usr/bin/env bash
# Start llmservice: create .venv, install what this machine and .env need, then serve.
#   ./start_service.sh                  install (first run only) and serve
#   ./start_service.sh --install-only   install, do not serve (add --dev for test tools and every engine)
#   --unlocked                          resolve from pyproject.toml's ranges, ignoring constraints.txt
#                                       (tests/relock.sh uses it to refresh the lock)
# Installs the versions locked in constraints.txt, tested together by the whole suite.
# Environment: PYTHON (default python3), VENV (default .venv), LLMSERVICE_EXTRAS (override the
# pip extras, e.g. "llamacpp,mlx,embeddings,rag,models"), TORCH_SPEC (torch requirement on CPU Linux).
set -euo pipefail
cd "$(dirname "$0")"

install_only=0
dev=0
locked=1
for arg in "$@"; do
  case "$arg" in
    --install-only) install_only=1 ;;
    --dev) dev=1 ;;
    --unlocked) locked=0 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "start_service.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
os=$(uname -s)
arch=$(uname -m)
has_cuda=0
command -v nvidia-smi >/dev/null 2>&1 && has_cuda=1

if [ "$install_only" = 0 ] && [ ! -f .env ]; then
  cp .env.example .env
  echo "start_service.sh: created .env from .env.example"
fi
config=.env
[ -f "$config" ] || config=.env.example

# Extras: llama.cpp everywhere; MLX on Apple Silicon or when a tier asks for it; torch-based
# embedders/rerankers, and the vector store for RAG collections (which embed on that tier), when an
# embedding or reranker tier is configured.
extras="llamacpp,models"
if [ "$dev" = 1 ]; then
  extras="llamacpp,models,mlx,mlx-vlm,embeddings,rag,dev"
else
  if { [ "$os" = Darwin ] && [ "$arch" = arm64 ]; } || grep -Eqi '^[A-Z]+_BACKEND=mlx' "$config"; then
    extras="$extras,mlx,mlx-vlm"  # mlx-vlm: vision-language model folders on MLX tiers
  fi
  if grep -Eq '^(EMBEDDING|RERANKER)_MODEL_PATH=.+' "$config"; then
    extras="$extras,embeddings,rag"
  fi
fi
extras=${LLMSERVICE_EXTRAS:-$extras}

# llama-cpp-python compiles from source: Metal is its default on macOS; CUDA needs asking for.
if [ -z "${CMAKE_ARGS:-}" ]; then
  if [ "$has_cuda" = 1 ]; then
    export CMAKE_ARGS="-DGGML_CUDA=on -DLLAVA_BUILD=ON"
  else
    export CMAKE_ARGS="-DLLAVA_BUILD=ON"
  fi
fi

# An unpinned torch on CPU-only Linux pulls a multi-GB CUDA build: pin the CPU one first.
torch_spec=""
if [[ ",$extras," == *",embeddings,"* ]] && [ "$os" = Linux ] && [ "$has_cuda" = 0 ]; then
  torch_spec=${TORCH_SPEC:-torch==2.13.0}
fi

say() { echo "start_service.sh: $*"; }

# Run pip with its output in a log; print what it is doing every 20 s (a first install compiles
# llama-cpp-python for ~10 minutes) and the log's tail if it fails.
pip_install() {
  local log started pid last next=20
  log=$(mktemp)
  started=$SECONDS
  "$VENV/bin/python" -m pip install --progress-bar off "$@" >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 2
    if (( SECONDS - started >= next )); then
      next=$(( next + 20 ))
      last=$(grep -E '^(Collecting|Downloading|Building|Installing|  Building|Successfully)' "$log" | tail -n 1 | cut -c1-100)
      say "  ... $(( (SECONDS - started) / 60 ))m$(( (SECONDS - started) % 60 ))s: ${last:-working}"
    fi
  done
  if ! wait "$pid"; then
    tail -n 30 "$log" >&2
    say "pip install failed (full log: $log)" >&2
    exit 1
  fi
  grep -E '^Successfully installed' "$log" | cut -c1-300 || true
  rm -f "$log"
}

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi

constraints=()
inputs=(pyproject.toml)
if [ "$locked" = 1 ]; then
  constraints=(-c constraints.txt)
  inputs+=(constraints.txt)
fi
stamp="$VENV/.llmservice-install"
want="$(cat "${inputs[@]}" | sha256sum | cut -c1-16) $extras $torch_spec $CMAKE_ARGS locked=$locked"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  started=$SECONDS
  if [ -n "$torch_spec" ]; then
    say "installing $torch_spec (the CPU build)"
    pip_install ${constraints[@]+"${constraints[@]}"} "$torch_spec"
  fi
  say "installing llmservice[$extras] into $VENV$([ "$locked" = 1 ] && echo " at the versions in constraints.txt")"
  "$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null \
    || say "llama-cpp-python is built from source on a first install: ~10 min on two cores (seconds from pip's cache)"
  pip_install ${constraints[@]+"${constraints[@]}"} --only-binary=langchain-core -e ".[$extras]"
  # pip keeps an installed llama-cpp-python, and reuses a cached build of it, whatever CMAKE_ARGS
  # were then: one built without mtmd (images) before LLAVA_BUILD=ON was asked for is rebuilt.
  if [[ "$CMAKE_ARGS" == *LLAVA_BUILD=ON* ]] && ! "$VENV/bin/python" -c 'import llama_cpp.mtmd_cpp' >/dev/null 2>&1; then
    say "rebuilding llama-cpp-python with mtmd (image input): ~10 min on two cores"
    version=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
    pip_install --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$version"
  fi
  if [ -n "$torch_spec" ]; then
    "$VENV/bin/python" - "$torch_spec" <<'PY'
import sys, torch
want = sys.argv[1].split("==")[-1]
if not torch.__version__.startswith(want):
    sys.exit(f"start_service.sh: torch {torch.__version__} replaced the pinned {want}; reinstall with pip install '{sys.argv[1]}'")
PY
  fi
  echo "$want" > "$stamp"
  say "installed in $(( (SECONDS - started) / 60 ))m$(( (SECONDS - started) % 60 ))s"
fi

[ "$install_only" = 1 ] && exit 0
exec "$VENV/bin/python" -m service.cli serve
