"""The helpers behind PATCH /v1/config: settings back to variables, and `.env` edited line by line."""

from __future__ import annotations

from pathlib import Path

import pytest
from dotenv import dotenv_values

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
    expected = "A=1\nexport LIGHT_TOP_K=3\n# LIGHT_TOP_P=0.1\nLIGHT_TOP_K=5  # later one wins\nZ=9\nLIGHT_TOP_P=0.5\n"
    assert real.read_text() == expected
    assert link.is_symlink() and real.stat().st_mode & 0o777 == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("line", "written"),
    [
        ("LIGHT_TOP_P=0.9  # warmer answers\n", "LIGHT_TOP_P=0.5  # warmer answers\n"),
        ("LIGHT_TOP_P='0.9' # quoted\n", "LIGHT_TOP_P=0.5 # quoted\n"),
        ('LIGHT_TOP_P="0.9 # not a comment"\n', "LIGHT_TOP_P=0.5\n"),
        ("LIGHT_TOP_P=0.9#glued: part of the value\n", "LIGHT_TOP_P=0.5\n"),
        ("LIGHT_TOP_P=0.9\r\n", "LIGHT_TOP_P=0.5\n"),
    ],
)
def test_write_keeps_the_inline_comment_of_the_line_it_changes(tmp_path: Path, line: str, written: str) -> None:
    env = tmp_path / ".env"
    env.write_bytes(f"# top\n{line}".encode())
    write_variables(env, {"LIGHT_TOP_P": "0.5"})
    assert env.read_bytes().decode() == f"# top\n{written}"
    assert dotenv_values(env)["LIGHT_TOP_P"] == "0.5"  # the comment stays a comment
