#!/usr/bin/env bash
# The whole test suite from scratch: installs every engine and test tool into .venv (VENV) and the
# Node SDK into tests/node at the locked versions, then runs pytest offline. Extra arguments go to
# pytest (e.g. tests/unit, -k chat).
set -euo pipefail
cd "$(dirname "$0")/.."
./start_service.sh --install-only --dev
# tests/browser drive Debian's headless Chromium through Playwright (pip, locked): never `playwright install`.
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# The openai Node SDK for tests/api/test_node_sdk.py, at the versions its package-lock.json pins.
npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
# The coding agents (Codex CLI, Claude Code and the Node 22 it needs) for tests/agents, pinned the same way.
npm ci --prefix tests/agents --no-audit --no-fund --loglevel=error
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
# Two test files at a time (TEST_WORKERS; 0 runs them in this process): a test file's server decodes
# on one thread, so two keep two cores busy. A file's tests stay together on one worker (loadfile),
# sharing its live server.
workers=${TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  exec "${VENV:-.venv}/bin/python" -m pytest "$@"
fi
exec "${VENV:-.venv}/bin/python" -m pytest -n "$workers" --dist loadfile "$@"
