"""Model lifecycle against real engines: a real GGUF loaded into a tier by path (MODELS_DIR), and a
broken GGUF that llama.cpp refuses, which fails its tier alone. The lifecycle itself (lazy load,
keep-alive, pinning, unload during a stream, failed tiers, load order) is about the app:
tests/app/test_lifecycle.py, on the fake engines."""

from __future__ import annotations

import os
from pathlib import Path

from tests.live import live_server

CHAT = {"model": "light", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def test_health_is_503_only_when_no_tier_can_serve(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"nothing useful")
    with live_server({"LIGHT_MODEL_PATH": str(bad)}, wait_for=("light",)) as server, server.client() as http:
        res = http.get("/health")
        assert res.status_code == 503 and res.json()["status"] == "unhealthy"
        assert res.json()["tiers"]["light"]["state"] == "failed"
        assert "broken.gguf" in res.json()["tiers"]["light"]["error"]


def test_a_real_gguf_loads_by_path_inside_models_dir(gemma_gguf: str, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(gemma_gguf, models / "tiny-270m.gguf")
    env = {"LIGHT_MODEL_PATH": gemma_gguf, "LIGHT_PRELOAD": "false", "MEDIUM_N_CTX": "256", "MODELS_DIR": str(models)}
    with live_server(env) as server, server.client() as http:
        res = http.post("/v1/models/medium/load", json={"model_path": "tiny-270m.gguf"})
        assert res.status_code == 200, res.text
        assert res.json()["id"] == "medium/tiny-270m" and res.json()["status"] == "loaded"
        assert res.json()["engine"] == "llamacpp" and res.json()["size_bytes"] == os.path.getsize(gemma_gguf)
        chat = http.post("/v1/chat/completions", json={**CHAT, "model": "medium"})
        assert chat.status_code == 200
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["light/gemma-3-270m", "medium/tiny-270m"]
