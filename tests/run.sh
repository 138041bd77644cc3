#!/usr/bin/env bash
# The whole test suite from scratch: installs every engine and test tool into .venv (VENV) at the
# locked versions, then runs pytest offline. Extra arguments go to pytest (e.g. tests/unit, -k chat).
set -euo pipefail
cd "$(dirname "$0")/.."
./start_service.sh --install-only --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
