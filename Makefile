# The commands people run, in one place. Each is a thin wrapper over a script you can also call directly.
.PHONY: help serve install test test-fast test-app check ci clients-latest relock bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

serve:  ## install the locked versions into .venv on first run, then serve (./start_service.sh)
	./start_service.sh

install:  ## install the service and the test tools into .venv, then stop
	./start_service.sh --install-only --dev

test:  ## the whole suite from scratch, as CI runs it (installs first)
	./tests/run.sh

test-fast:  ## the suite without the slow tests or the coding agents (installs first)
	./tests/run.sh -m "not slow" --ignore=tests/agents

test-app:  ## unit and app tests on the weightless fake engines: seconds, no install
	.venv/bin/python -m pytest -q tests/unit tests/app

check:  ## what a reviewer checks: ruff, ruff format, mypy strict, pip check
	./tests/check.sh

ci:  ## exactly what CI runs: test then check
	bash .ci/run

clients-latest:  ## the client suites against the newest openai/anthropic/langchain SDKs and agents
	./tests/clients-latest.sh

relock:  ## resolve every dependency afresh, run the suite, rewrite constraints.txt when it passes
	./tests/relock.sh

bench:  ## list the benchmarks (each prints its own --help; results go in docs/benchmarks.md)
	@ls bench/bench_*.py | xargs -n1 basename
