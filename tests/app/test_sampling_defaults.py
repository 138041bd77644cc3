"""The serving layer's side of sampling defaults: what reaches the engine for each field (the
request's value, the tier's setting, the model card's, the built-in one), on every generating API,
and a tier's first request waiting for the card."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from backends.base import GenerationRequest
from embedders.fake import FakeEmbedder
from rerankers.fake import FakeReranker
from service.tiers.families import EngineFactories
from tests.live import fake_app, recording_backend

CARD = {"temperature": 0.2, "top_p": 0.8, "top_k": 7, "repeat_penalty": 1.05}
CHAT = {"model": "light", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _engines(seen: list[GenerationRequest]) -> EngineFactories:
    backend = functools.partial(recording_backend(seen), sampling=CARD)
    return EngineFactories(backend=backend, embedder=FakeEmbedder, reranker=FakeReranker)


def _sampled(request: GenerationRequest) -> tuple[float, float, int, float, float]:
    r = request
    return (r.temperature, r.top_p, r.top_k, r.min_p, r.repeat_penalty)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", {"model": "light", "prompt": "hi", "max_tokens": 4}),
        ("/v1/messages", {**CHAT, "max_tokens": 4}),
        ("/v1/responses", {"model": "light", "input": "hi", "max_output_tokens": 4}),
    ],
)
def test_each_field_comes_from_the_request_then_settings_then_card_then_built_in(
    path: str, body: dict[str, Any]
) -> None:
    seen: list[GenerationRequest] = []
    env = {"LIGHT_MODEL_PATH": "fake/light", "LIGHT_TOP_P": "0.5"}
    with fake_app(env, engines=_engines(seen)) as http:
        res = http.post(path, json=body)
        assert res.status_code == 200, res.text
        # temperature, top_k, repeat_penalty: the card; top_p: the setting; min_p: built-in.
        assert _sampled(seen[-1]) == (0.2, 0.5, 7, 0.0, 1.05)
        if path == "/v1/responses":  # the response echoes what it sampled with
            assert (res.json()["temperature"], res.json()["top_p"]) == (0.2, 0.5)
        res = http.post(path, json={**body, "temperature": 1.0, "top_p": 0.9})
        assert res.status_code == 200, res.text
        assert _sampled(seen[-1])[:2] == (1.0, 0.9)


def test_a_lazy_tiers_first_request_waits_for_the_card() -> None:
    """Before its first load a tier's card is unknown: the request that loads it still gets its values."""
    seen: list[GenerationRequest] = []
    env = {"LIGHT_MODEL_PATH": "fake/light", "LIGHT_PRELOAD": "false", "ENABLE_CACHE": "true"}
    seeded = {**CHAT, "seed": 1}  # deterministic: cached
    with fake_app(env, engines=_engines(seen)) as http:
        assert http.get("/v1/models/light").json()["details"]["sampling"] is None  # not read yet
        first = http.post("/v1/chat/completions", json=seeded)
        assert first.status_code == 200 and first.headers["X-Cache"] == "MISS"
        assert _sampled(seen[-1]) == (0.2, 0.8, 7, 0.0, 1.05)
        sampling = http.get("/v1/models/light").json()["details"]["sampling"]
        assert sampling["top_p"] == {"value": 0.8, "source": "model card"}
        assert sampling["min_p"] == {"value": 0.0, "source": "built-in"}
        # The card is kept across an unload: a cached answer is served without loading the model again.
        assert http.post("/v1/models/light/unload").status_code == 200
        assert http.get("/v1/models/light").json()["details"]["sampling"] == sampling
        assert http.post("/v1/chat/completions", json=seeded).headers["X-Cache"] == "HIT"
        assert http.get("/health").json()["tiers"]["light"]["state"] == "available"
