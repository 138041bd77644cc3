"""`{TIER}_BACKEND`: auto picks MLX for model folders and llama.cpp for GGUF files; an engine that is
not installed fails its tier at start-up with the pip extra to install, shown by /health.

A missing MLX is simulated in-process by making `backends.factory.engine_available` answer no for
it; everything else (settings, registry, load task, health, error envelope) is the real app.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import backends.factory
from backends.factory import choose_engine, engine_available
from kernel.config import TierSettings
from tests.live import live_server

MLX_HINT = "pip install 'llmservice[mlx]'"


def without_mlx(monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine_available
    monkeypatch.setattr(backends.factory, "engine_available", lambda name: name != "mlx" and real(name))


def test_auto_picks_mlx_for_a_model_folder(tiny_mlx_model: Path) -> None:
    pytest.importorskip("mlx_lm")
    env = {"LIGHT_MODEL_PATH": str(tiny_mlx_model), "LIGHT_BACKEND": "auto", "LIGHT_N_CTX": "512"}
    with live_server(env, wait_for=("light",)) as live:
        light = httpx.get(f"{live.url}/health").json()["tiers"]["light"]
        assert (light["state"], light["engine"]) == ("loaded", "mlx")
        with live.client() as http:
            res = http.post("/v1/completions", json={"model": "light", "prompt": "Hi", "max_tokens": 2})
        assert res.status_code == 200 and res.json()["usage"]["completion_tokens"] == 2


def test_auto_picks_llamacpp_for_gguf_whether_or_not_mlx_exists(
    gemma_gguf: str, tiny_mlx_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto = TierSettings(name="light", backend="auto")
    assert choose_engine(auto, gemma_gguf) == "llamacpp"
    assert choose_engine(auto, "/models/not-there-yet.GGUF") == "llamacpp"
    if engine_available("mlx"):
        assert choose_engine(auto, str(tiny_mlx_model)) == "mlx"
        assert choose_engine(auto, "mlx-community/Qwen2.5-0.5B-Instruct-4bit") == "mlx"
    without_mlx(monkeypatch)
    assert choose_engine(auto, gemma_gguf) == "llamacpp"


@pytest.mark.parametrize("backend", ["mlx", "auto"])
def test_missing_mlx_fails_the_tier_naming_the_pip_extra(
    backend: str, tiny_mlx_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_mlx(monkeypatch)
    env = {"LIGHT_MODEL_PATH": str(tiny_mlx_model), "LIGHT_BACKEND": backend}
    with live_server(env, wait_for=("light",)) as live:
        light = httpx.get(f"{live.url}/health").json()["tiers"]["light"]
        assert light["state"] == "failed" and MLX_HINT in light["error"]
        assert "Tier light" in light["error"]
        with live.client() as http:
            res = http.post(
                "/v1/chat/completions", json={"model": "light", "messages": [{"role": "user", "content": "x"}]}
            )
        assert res.status_code == 503
        assert MLX_HINT in res.json()["error"]["message"]
