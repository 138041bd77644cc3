"""An upstream server for the remote-tier tests: llmservice on the fake engines, in its own process
(so a test can kill it), on the port given. `python tests/fake_upstream.py PORT [TOKEN_SECONDS] [REPLY]`;
REPLY `echo` (the prompt's last line) or `tool` (a Hermes tool call, which the upstream parses)."""

from __future__ import annotations

import dataclasses
import functools
import sys

import uvicorn

from backends.fake import FakeBackend, echo_last_line
from service.__main__ import server_config
from service.app import create_app
from service.settings import parse_settings
from service.testing import fake_engines

TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def main() -> None:
    port, token_seconds = int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    mode = sys.argv[3] if len(sys.argv) > 3 else "echo"
    reply = (lambda _: TOOL_CALL) if mode == "tool" else echo_last_line
    # Decoding 16 requests together, so a slow upstream still serves a test's streams side by side.
    backend = functools.partial(FakeBackend, reply=reply, token_seconds=token_seconds, max_batch=16)
    engines = dataclasses.replace(fake_engines(), backend=backend)
    env = {
        "LIGHT_MODEL_PATH": "fake/upstream",
        "LIGHT_MAX_QUEUE": "64",
        "EMBEDDING_MODEL_PATH": "fake/embedder",
        "RERANKER_MODEL_PATH": "fake/reranker",
        "LOG_LEVEL": "WARNING",
    }
    settings = parse_settings(env)
    app = create_app(settings, engines=engines)
    # The HTTP layer and event loop of `python -m service`, so benchmarks over it time ours.
    uvicorn.Server(server_config(app, settings, host="127.0.0.1", port=port)).run()


if __name__ == "__main__":
    main()
