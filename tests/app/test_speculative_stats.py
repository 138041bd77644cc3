"""Speculative decoding's counters as an operator sees them, on a fake engine that counts like
the real ones (`Backend.speculative_stats`): per tier in `/v1/stats` and in `/metrics`."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from backends.base import GenerationRequest, Token
from backends.fake import FakeBackend
from embedders.fake import FakeEmbedder
from kernel.config import TierSettings
from rerankers.fake import FakeReranker
from service.tiers.families import EngineFactories
from tests.app.test_prompt_cache_stats import metric
from tests.live import fake_app


class SpeculatingFake(FakeBackend):
    """Drafts 3 tokens per request and keeps 2; a request with a seed 'falls back' (counted)."""

    def __init__(self, tier: TierSettings, model_path: str) -> None:
        super().__init__(tier, model_path)
        self.counts = {"drafted": 0, "accepted": 0, "fallbacks": 0}

    def decode(
        self, prompt: list[int], request: GenerationRequest, max_tokens: int, cancel: threading.Event | None = None
    ) -> Iterator[Token]:
        if request.seed is not None:
            self.counts["fallbacks"] += 1
        else:
            self.counts["drafted"] += 3
            self.counts["accepted"] += 2
        yield from super().decode(prompt, request, max_tokens, cancel)

    def speculative_stats(self) -> dict[str, int] | None:
        return dict(self.counts) if self.tier.speculative != "off" else None


def test_counters_per_tier_in_stats_and_metrics() -> None:
    engines = EngineFactories(backend=SpeculatingFake, embedder=FakeEmbedder, reranker=FakeReranker)
    env = {
        "LIGHT_MODEL_PATH": "fake/gemma-3-270m",
        "LIGHT_SPECULATIVE": "ngram",
        "MEDIUM_MODEL_PATH": "fake/other",
    }
    with fake_app(env, engines=engines) as http:
        body = {"messages": [{"role": "user", "content": "Tell me about cats."}], "max_tokens": 4}
        for extra in ({}, {}, {"seed": 1}):
            for model in ("light", "medium"):
                assert http.post("/v1/chat/completions", json={**body, **extra, "model": model}).status_code == 200
        tiers = http.get("/v1/stats").json()["tiers"]
        assert tiers["light"]["speculative"] == {"drafted": 6, "accepted": 4, "fallbacks": 1}
        assert tiers["medium"]["speculative"] is None  # SPECULATIVE=off
        text = http.get("/metrics").text
        assert metric(text, "llmservice_speculative_drafted_tokens_total", tier="light") == 6
        assert metric(text, "llmservice_speculative_accepted_tokens_total", tier="light") == 4
        assert metric(text, "llmservice_speculative_fallbacks_total", tier="light") == 1
        assert 'llmservice_speculative_drafted_tokens_total{tier="medium"}' not in text
