#!/usr/bin/env bash
# The whole test suite from scratch: installs every engine and test tool into .venv, then runs
# pytest offline. Extra arguments go to pytest (e.g. tests/unit, -k chat, -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
./start_service.sh --install-only --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
exec .venv/bin/python -m pytest "$@"
