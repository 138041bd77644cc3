#!/usr/bin/env bash
# The client suites against the newest releases of the clients our users run: openai (Python and
# Node), anthropic, langchain-openai, openai-agents, Codex CLI and Claude Code (on Node 22). Run it
# whenever the API changes and before every release; the lock moves forward only after the whole
# suite passes (tests/relock.sh). Nothing in the checkout changes:
#   ./tests/clients-latest.sh                 (extra arguments go to pytest, e.g. -k "not mlx")
# A throwaway venv (CLIENTS_DIR, default a temporary folder, removed at the end unless KEEP=1)
# holds the newest Python clients and whatever they need; the server's own packages come from the
# project's venv (VENV, default .venv) behind them. A throwaway npm folder holds the newest Node
# clients; the tests take it from LLMSERVICE_NODE_DIR and LLMSERVICE_AGENTS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
project_venv=$(cd "${VENV:-.venv}" && pwd)
work=${CLIENTS_DIR:-$(mktemp -d -t llmservice-clients-XXXXXX)}
if [[ -z ${CLIENTS_DIR:-} && -z ${KEEP:-} ]]; then trap 'rm -rf "$work"' EXIT; fi
py_clients=(openai anthropic langchain-openai openai-agents)
node_clients=(openai@latest @openai/codex@latest @anthropic-ai/claude-code@latest node@22)

echo "clients-latest: Python clients into $work/venv"
"$project_venv/bin/python" -m venv "$work/venv"
# --only-binary: pip once backtracked into an old langchain-core sdist that does not build.
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: -U "${py_clients[@]}"
# Behind the newest clients: the project's venv, for the server and the test tools (pytest, the
# engines). addsitedir also reads its .pth files; it goes after this venv's own packages.
site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
project_site=$("$project_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "import site; site.addsitedir('$project_site')" > "$site/zz-llmservice-project.pth"

echo "clients-latest: Node clients into $work/npm"
mkdir -p "$work/npm"
echo '{"name": "llmservice-clients-latest", "private": true, "type": "module"}' > "$work/npm/package.json"
npm install --prefix "$work/npm" --no-audit --no-fund --loglevel=error "${node_clients[@]}" >/dev/null
cp tests/node/client.mjs "$work/npm/"  # ESM resolves `openai` beside the script, so it runs from there

versions=$(
    "$work/venv/bin/python" -c "
import importlib.metadata as m
print(', '.join(f'{p} {m.version(p)}' for p in '${py_clients[*]}'.split()))"
    for package in openai @openai/codex @anthropic-ai/claude-code node; do
        node -e "process.stdout.write('npm $package ' + require('$work/npm/node_modules/$package/package.json').version + '\n')"
    done
)
echo "clients-latest: testing with"
echo "$versions" | sed 's/^/  /'

# The suites that drive a client: every test module importing one, the Node SDK and the agents.
mapfile -t suites < <(
    grep -l -E '^(import|from) (openai|anthropic|agents|langchain_openai)\b' -r tests --include='test_*.py' |
        grep -v '^tests/agents/' | sort
)
suites+=(tests/api/test_node_sdk.py tests/agents)
export PYTHONPATH=$repo LLMSERVICE_NODE_DIR=$work/npm LLMSERVICE_AGENTS_DIR=$work/npm
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
status=0
"$work/venv/bin/python" -m pytest -p no:cacheprovider -q "$@" "${suites[@]}" || status=$?
echo "clients-latest: pytest exit $status with:"
echo "$versions" | sed 's/^/  /'
exit $status
