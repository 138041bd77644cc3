"""LoRA adapters over HTTP on the MLX engine (mlx-lm adapter folders built for the tiny model):
configured and runtime-loaded adapters, per-request selection, 404 adapter_not_found, and requests
with different adapters decoding side by side."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.lora import build_mlx_lora
from tests.live import LiveServer, completion_text, live_server

ADMIN = {"Authorization": "Bearer admin-key"}


@pytest.fixture(scope="module")
def models_dir(tiny_mlx_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mlx-adapters")
    build_mlx_lora(tiny_mlx_model, folder / "random", zero=False, seed=2)
    build_mlx_lora(tiny_mlx_model, folder / "zero", zero=True)
    return folder


@pytest.fixture(scope="module")
def server(tiny_mlx_model: Path, models_dir: Path) -> Iterator[LiveServer]:
    env = {
        "LIGHT_MODEL_PATH": str(tiny_mlx_model),
        "LIGHT_BACKEND": "mlx",
        "LIGHT_N_CTX": "512",
        "LIGHT_TEMPERATURE": "0",
        "LIGHT_MAX_BATCH": "3",
        "LIGHT_ADAPTERS": f"random={models_dir / 'random'}",
        "MODELS_DIR": str(models_dir),
        "API_KEYS": "user-key",
        "ADMIN_API_KEYS": "admin-key",
    }
    with live_server(env, wait_for=("light",)) as live:
        yield live


def complete(http: httpx.Client, model: str, prompt: str = "one two three", **extra: Any) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 10, **extra})


def test_mlx_adapters_load_and_apply_per_request(server: LiveServer) -> None:
    with server.client(headers=ADMIN) as http:
        card = {c["id"]: c for c in http.get("/v1/adapters").json()["data"]}["random"]
        assert (card["status"], card["rank"]) == ("loaded", 4)
        base, tuned = completion_text(complete(http, "light")), completion_text(complete(http, "light:random"))
        assert tuned != base
        loaded = http.post("/v1/adapters/load", json={"model": "light", "adapter": "zero", "path": "zero"})
        assert loaded.status_code == 200, loaded.text
        assert completion_text(complete(http, "light", adapter="zero")) == base  # lora_b = 0 adds nothing
        missing = complete(http, "light:nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found"
        cases = ["light", "light:random", "light:zero"]
        with ThreadPoolExecutor(len(cases)) as pool:
            together = list(pool.map(lambda model: completion_text(complete(http, model)), cases))
        assert together == [base, tuned, base]
        assert http.post("/v1/adapters/unload", json={"model": "light", "adapter": "zero"}).status_code == 200
        assert complete(http, "light:zero").status_code == 404
