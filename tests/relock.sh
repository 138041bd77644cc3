#!/usr/bin/env bash
# Refresh constraints.txt: resolve every extra afresh from pyproject.toml's ranges into a new venv,
# run the whole suite and the checks on it, and only when both pass write the versions they used.
#   ./tests/relock.sh            (extra arguments go to pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=${RELOCK_VENV:-.venv-relock}
rm -rf "$VENV"
./start_service.sh --install-only --dev --unlocked
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
./tests/check.sh
{
  echo "# The versions the whole test suite passed with, on $(uname -s) $(uname -m), Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())')."
  echo "# Used as pip constraints by start_service.sh and tests/run.sh. Refresh with ./tests/relock.sh."
  echo "# torch's local tag (+cpu) is dropped so that CUDA boxes get the same release from PyPI."
  "$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -i '^llmservice' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt
echo "tests/relock.sh: wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
