"""The prompt cache as an operator sees it, on a fake engine holding a real `PromptCache`:
`/v1/cache/stats` (`prompt`, per tier), `/metrics`, and `/v1/cache/clear` with `prefix`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from backends.base import GenerationRequest, Token
from backends.fake import FakeBackend
from backends.prompt_cache import PromptCache
from embedders.fake import FakeEmbedder
from kernel.config import TierSettings
from rerankers.fake import FakeReranker
from service.tiers.families import EngineFactories
from tests.live import fake_app


class CachingFake(FakeBackend):
    """Keeps each prompt in a RAM-tier prompt cache and restores the longest cached prefix."""

    def __init__(self, tier: TierSettings, model_path: str) -> None:
        super().__init__(tier, model_path)
        self.cache = PromptCache(f"fake:{model_path}", tier.prompt_cache_ram_bytes)

    def decode(
        self, prompt: list[int], request: GenerationRequest, max_tokens: int, cancel: threading.Event | None = None
    ) -> Iterator[Token]:
        entry, n = self.cache.longest(prompt, len(prompt) - 1)
        if entry is None or self.cache.take(entry) is None:
            self.cache.miss()
            n = 0
        self.cache.put(tuple(prompt), [bytes(t % 256 for t in prompt)], [])
        for i, token in enumerate(super().decode(prompt, request, max_tokens, cancel)):
            yield Token(token.text, cached_tokens=n if i == 0 else 0, final=token.final)

    def prompt_cache_stats(self) -> dict[str, Any] | None:
        return self.cache.stats()

    def reset_prefix_cache(self) -> None:
        self.cache.clear()


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_stats_metrics_and_clear() -> None:
    engines = EngineFactories(backend=CachingFake, embedder=FakeEmbedder, reranker=FakeReranker)
    env = {"LIGHT_MODEL_PATH": "fake/gemma-3-270m", "PROMPT_CACHE_RAM_BYTES": "1000000"}
    with fake_app(env, engines=engines) as http:
        body = {"model": "light", "messages": [{"role": "user", "content": "Tell me about cats."}], "max_tokens": 4}
        for _ in range(2):
            assert http.post("/v1/chat/completions", json=body).status_code == 200
        prompt = http.get("/v1/cache/stats").json()["prompt"]["light"]
        assert prompt["misses"] == 1 and prompt["ram"]["hits"] == 1
        assert prompt["ram"]["entries"] == 1 and prompt["ram"]["bytes"] > 0
        assert prompt["ram"]["budget_bytes"] == 1_000_000 and prompt["disk"]["entries"] == 0
        text = http.get("/metrics").text
        assert metric(text, "llmservice_cache_hits_total", cache="prompt_ram", kind="light") == 1
        assert metric(text, "llmservice_cache_misses_total", cache="prompt", kind="light") == 1
        assert metric(text, "llmservice_prompt_cache_entries", tier="light", kind="ram") == 1
        assert metric(text, "llmservice_prompt_cache_bytes", tier="light", kind="ram") == prompt["ram"]["bytes"]
        cleared = http.post("/v1/cache/clear", json={"target": "prefix"}).json()
        assert cleared["cleared"]["prefix"]["tiers"] == ["light"]
        prompt = http.get("/v1/cache/stats").json()["prompt"]["light"]
        assert prompt["ram"]["entries"] == prompt["ram"]["bytes"] == 0
