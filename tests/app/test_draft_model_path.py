"""`{TIER}_DRAFT_MODEL_PATH` takes MODEL_PATH's forms: the engine is handed the resolved path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import tests.fixtures
from backends.fake import FakeBackend
from embedders.fake import FakeEmbedder
from kernel.config import TierSettings
from rerankers.fake import FakeReranker
from service.tiers.families import EngineFactories
from tests.live import fake_app


@pytest.mark.parametrize(
    ("spec", "resolved"),
    [
        ("package:tests.fixtures", str(Path(tests.fixtures.__file__).parent)),  # a package that ships a model
        ("~", str(Path.home().resolve())),
        ("org/draft-model", "org/draft-model"),  # a hub repo id, kept for the engine to fetch
    ],
)
def test_the_engine_gets_the_resolved_draft_path(spec: str, resolved: str) -> None:
    seen: list[TierSettings] = []

    def backend(tier: TierSettings, path: str) -> Any:
        seen.append(tier)
        return FakeBackend(tier, path)

    engines = EngineFactories(backend=backend, embedder=FakeEmbedder, reranker=FakeReranker)
    env = {"LIGHT_MODEL_PATH": "fake/light", "LIGHT_SPECULATIVE": "draft", "LIGHT_DRAFT_MODEL_PATH": spec}
    with fake_app(env, engines=engines) as http:
        assert http.get("/health").status_code == 200
    assert seen and seen[-1].draft_model_path == resolved
