#!/usr/bin/env bash
# What a reviewer checks besides the tests: lint, format, strict types, consistent installed packages.
# Runs in the venv that tests/run.sh installed (VENV, default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy"
"$venv/bin/python" -m pip check
