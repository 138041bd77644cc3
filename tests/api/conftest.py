"""Fixtures shared by the HTTP suites that run against both generation engines."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.live import LiveServer, live_server


@pytest.fixture(scope="module", params=["llamacpp", "mlx"])
def engine_server(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """The light tier on llama.cpp (the real Gemma 3 270M GGUF) or MLX (a tiny random model),
    greedy, with a short default max_tokens."""
    engine = request.param
    if engine == "llamacpp":
        path = request.getfixturevalue("gemma_gguf")
    else:
        path = str(request.getfixturevalue("tiny_mlx_model"))
    env = {
        "LIGHT_MODEL_PATH": path,
        "LIGHT_BACKEND": engine,
        "LIGHT_N_CTX": "1024",
        "LIGHT_MAX_TOKENS": "12",
        "LIGHT_TEMPERATURE": "0",
    }
    with live_server(env, wait_for=("light",)) as live:
        assert live.app.state.registry.slots["light"].engine_name == engine
        yield live
