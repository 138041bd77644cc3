"""Sampling defaults from the model card, on both engines: a GGUF's `general.sampling.*` and an MLX
folder's `generation_config.json`. Per field, as llama-server takes them: the request's own value,
then the tier's setting, then the card's, then the built-in one.

Observed through what the server reports (`/v1/models/{id}` details) and through the response
cache, which stores only deterministic answers: the cards here say temperature 0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from tests.fixtures.tiny_mamba import build_tiny_mamba
from tests.live import live_server

GGUF_CARD = {"temp": 0.0, "top_p": 0.8, "top_k": 7, "penalty_repeat": 1.05}
MLX_CARD = {"temperature": 0.0, "top_p": 0.8, "top_k": 7, "repetition_penalty": 1.05}
FROM_CARD = {
    "temperature": {"value": 0.0, "source": "model card"},
    "top_p": {"value": 0.8, "source": "model card"},
    "top_k": {"value": 7, "source": "model card"},
    "min_p": {"value": 0.0, "source": "built-in"},  # neither card sets it
    "repeat_penalty": {"value": 1.05, "source": "model card"},
}
PROMPT = {"model": "light", "prompt": "the cat sat on", "max_tokens": 4}


@pytest.fixture(scope="module", params=["llamacpp", "mlx"])
def carded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The light tier's settings for a tiny model whose card gives sampling defaults."""
    folder = tmp_path_factory.mktemp("carded")
    if request.param == "llamacpp":
        path = build_tiny_mamba(folder / "carded.gguf", card=GGUF_CARD)
    else:
        path = folder / "carded-mlx"
        shutil.copytree(request.getfixturevalue("tiny_mlx_model"), path)
        config = path / "generation_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), **MLX_CARD}))
    return {
        "LIGHT_MODEL_PATH": str(path),
        "LIGHT_BACKEND": request.param,
        "LIGHT_N_CTX": "512",
        "LIGHT_MAX_BATCH": "1",
        "ENABLE_CACHE": "true",
        "CACHE_PERSIST_TO_DISK": "false",
    }


def _cached(http: httpx.Client, body: dict[str, object]) -> list[str | None]:
    """The X-Cache header of the same completion asked twice (None: not deterministic, not cached)."""
    out = []
    for _ in range(2):
        res = http.post("/v1/completions", json=body)
        assert res.status_code == 200, res.text
        out.append(res.headers.get("X-Cache"))
    return out


def _sampling(http: httpx.Client) -> dict[str, object]:
    res = http.get("/v1/models/light")
    assert res.status_code == 200, res.text
    return res.json()["details"]["sampling"]  # type: ignore[no-any-return]


def test_a_request_without_sampling_fields_gets_the_cards_values(carded: dict[str, str]) -> None:
    with live_server(carded, wait_for=("light",)) as live, live.client() as http:
        assert _sampling(http) == FROM_CARD
        assert _cached(http, PROMPT) == ["MISS", "HIT"]  # the card's temperature 0: greedy, so cached


def test_a_setting_beats_the_card_and_a_request_field_beats_both(carded: dict[str, str]) -> None:
    with live_server({**carded, "LIGHT_TEMPERATURE": "0.9"}, wait_for=("light",)) as live, live.client() as http:
        assert _sampling(http) == {**FROM_CARD, "temperature": {"value": 0.9, "source": "settings"}}
        assert _cached(http, PROMPT) == [None, None]  # sampled at 0.9: never cached
        assert _cached(http, {**PROMPT, "temperature": 0}) == ["MISS", "HIT"]


def test_a_lazy_tier_reads_its_card_without_loading(carded: dict[str, str], tmp_path: Path) -> None:
    """After a restart a persisted answer is served before the model loads: the card comes from the
    files alone (GGUF metadata without the weights, generation_config.json)."""
    persisted = {**carded, "CACHE_PERSIST_TO_DISK": "true", "CACHE_DIR": str(tmp_path / "cache")}
    with live_server(persisted, wait_for=("light",)) as live, live.client() as http:
        assert _cached(http, PROMPT) == ["MISS", "HIT"]
    with live_server({**persisted, "LIGHT_PRELOAD": "false"}) as live, live.client() as http:
        assert http.post("/v1/completions", json=PROMPT).headers["X-Cache"] == "HIT"
        assert http.get("/health").json()["tiers"]["light"]["state"] == "available"  # never loaded
        assert _sampling(http) == FROM_CARD
