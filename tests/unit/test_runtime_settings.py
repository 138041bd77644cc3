"""The helpers behind PATCH /v1/config: settings back to variables, and `.env` edited line by line."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import SettingsError, load_settings, parse_settings, with_variables, write_variables

EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"MAX_TOKENS_LIMIT": "500", "EMBEDDING_MODEL_PATH": "/e", "LIGHT_MODEL_PATH": "/m.gguf"},
        {"LIGHT_MODEL_PATH": "/m", "LIGHT_TEMPERATURE": "0", "API_KEYS": "a,b", "CORS_ORIGINS": "",
         "RERANKER_MODEL_PATH": "tier:embedding", "RERANKER_HYBRID_WEIGHTS": "1,0,0.5", "LOG_LEVEL": "debug"},
    ],
)  # fmt: skip
def test_settings_parse_back_from_their_variables(env: dict[str, str]) -> None:
    settings = parse_settings(env)
    assert with_variables(settings, {}) == settings


def test_the_example_file_parses_back_too() -> None:
    settings = load_settings(EXAMPLE, {})
    assert with_variables(settings, {}) == settings


def test_changes_are_checked_by_the_start_up_parser() -> None:
    settings = parse_settings({"LIGHT_MODEL_PATH": "/m", "MAX_TOKENS_LIMIT": "100"})
    assert with_variables(settings, {"LIGHT_TOP_K": "7"}).tier("light").top_k == 7
    with pytest.raises(SettingsError, match="LIGHT_MAX_TOKENS='200': above MAX_TOKENS_LIMIT=100"):
        with_variables(settings, {"LIGHT_MAX_TOKENS": "200"})
    with pytest.raises(SettingsError, match="does not apply to the embedding tier"):
        with_variables(settings, {"EMBEDDING_TEMPERATURE": "0.1"})


def test_write_edits_the_last_assignment_and_appends_new_ones(tmp_path: Path) -> None:
    real = tmp_path / "real.env"
    real.write_text("A=1\nexport LIGHT_TOP_K=3\n# LIGHT_TOP_P=0.1\nLIGHT_TOP_K = 4  # later one wins\nZ=9")
    real.chmod(0o600)
    link = tmp_path / ".env"
    link.symlink_to(real)
    write_variables(link, {"LIGHT_TOP_K": "5", "LIGHT_TOP_P": "0.5"})
    assert real.read_text() == "A=1\nexport LIGHT_TOP_K=3\n# LIGHT_TOP_P=0.1\nLIGHT_TOP_K=5\nZ=9\nLIGHT_TOP_P=0.5\n"
    assert link.is_symlink() and real.stat().st_mode & 0o777 == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
