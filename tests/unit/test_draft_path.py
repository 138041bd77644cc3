"""`{TIER}_DRAFT_MODEL_PATH`: resolved as MODEL_PATH is before the engine sees it, and counted in
the memory estimate (a second model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel.config import TierSettings
from kernel.errors import ModelUnavailableError
from service.tiers.budget import estimate_bytes
from service.tiers.model_paths import resolve_draft_path


def test_draft_path_resolved_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, draft = tmp_path / "model.gguf", tmp_path / "draft.gguf"
    model.write_bytes(b"x" * 1000)  # not a GGUF header: weights only, no KV bound
    draft.write_bytes(b"y" * 300)
    monkeypatch.chdir(tmp_path)
    tier = TierSettings(name="light", speculative="draft", draft_model_path="draft.gguf")
    assert resolve_draft_path(tier).draft_model_path == str(draft)
    assert estimate_bytes(tier, str(model)) == 1300
    off = TierSettings(name="light", draft_model_path="draft.gguf")  # not speculating: left alone
    assert resolve_draft_path(off) is off and estimate_bytes(off, str(model)) == 1000


def test_missing_draft_model_names_the_setting(tmp_path: Path) -> None:
    tier = TierSettings(name="light", speculative="draft", draft_model_path=str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelUnavailableError, match="LIGHT_DRAFT_MODEL_PATH"):
        resolve_draft_path(tier)
