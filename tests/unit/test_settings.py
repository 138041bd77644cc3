from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from service.settings import EMBEDDED_DEFAULTS, TIERS, SettingsError, load_settings, parse_settings

if TYPE_CHECKING:
    from tests.conftest import StartService

FIELDS = [
    "MODEL_PATH",
    "BACKEND",
    "N_CTX",
    "N_BATCH",
    "N_THREADS",
    "N_GPU_LAYERS",
    "TEMPERATURE",
    "TOP_P",
    "TOP_K",
    "MAX_TOKENS",
    "REPEAT_PENALTY",
    "USE_MMAP",
    "USE_MLOCK",
    "EMBEDDING_MODE",
    "EMBEDDING_DIMENSION",
]
EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"


def test_every_documented_variable_parses() -> None:
    values = {
        "MODEL_PATH": "/m.gguf",
        "BACKEND": "llamacpp",
        "N_CTX": "8192",
        "N_BATCH": "256",
        "N_THREADS": "8",
        "N_GPU_LAYERS": "-1",
        "TEMPERATURE": "0.2",
        "TOP_P": "0.9",
        "TOP_K": "20",
        "MAX_TOKENS": "64",
        "REPEAT_PENALTY": "1.05",
        "USE_MMAP": "false",
        "USE_MLOCK": "true",
        "EMBEDDING_MODE": "true",
        "EMBEDDING_DIMENSION": "1024",
    }
    env = {f"{t.upper()}_{k}": v for t in TIERS for k, v in values.items()}
    env |= {
        "PORT": "9001",
        "HOST": "0.0.0.0",
        "LOG_LEVEL": "debug",
        "SHUTDOWN_TIMEOUT": "600",
        "ENABLE_CACHE": "true",
        "CACHE_MAX_SIZE": "5",
        "CACHE_TTL_SECONDS": "60",
        "CACHE_PERSIST_TO_DISK": "yes",
    }
    s = parse_settings(env)
    assert (s.port, s.host, s.log_level, s.shutdown_timeout) == (9001, "0.0.0.0", "DEBUG", 600)
    assert s.enable_cache and s.cache_persist_to_disk and s.cache_max_size == 5
    for tier in TIERS:
        t = s.tier(tier)
        assert (t.n_ctx, t.n_batch, t.n_threads, t.n_gpu_layers, t.top_k, t.max_tokens) == (8192, 256, 8, -1, 20, 64)
        assert (t.use_mmap, t.use_mlock, t.embedding_mode, t.embedding_dimension) == (False, True, True, 1024)
        assert t.temperature == 0.2 and t.repeat_penalty == 1.05 and t.backend == "llamacpp"


def test_example_file_documents_every_tier_variable() -> None:
    text = EXAMPLE.read_text()
    for tier in TIERS:
        for field in FIELDS:
            assert f"{tier.upper()}_{field}=" in text, f"{tier.upper()}_{field} is not in .env.example"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"LIGHT_BACKEND": "vllm"}, "LIGHT_BACKEND"),
        ({"MEDIUM_N_CTX": "abc"}, "MEDIUM_N_CTX"),
        ({"HEAVY_N_THREADS": "-2"}, "HEAVY_N_THREADS"),
        ({"LIGHT_TEMPERATURE": "9"}, "LIGHT_TEMPERATURE"),
        ({"PORT": "http"}, "PORT"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
        ({"LIGHT_USE_MMAP": "maybe"}, "LIGHT_USE_MMAP"),
    ],
)
def test_bad_value_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as err:
        parse_settings(env)
    message = str(err.value)
    assert variable in message and "\n" not in message


def test_backend_error_lists_allowed_values() -> None:
    with pytest.raises(SettingsError, match="auto, llamacpp, mlx"):
        parse_settings({"LIGHT_BACKEND": "vllm"})


def test_env_file_then_environment(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("LIGHT_MODEL_PATH=/from/file.gguf\nLIGHT_N_CTX=1024\nPORT=7000\n")
    s = load_settings(env_file, {"LIGHT_N_CTX": "2048", "UNRELATED": "x"})
    assert s.tier("light").model_path == "/from/file.gguf"
    assert s.tier("light").n_ctx == 2048 and s.port == 7000


def test_embedded_defaults_without_env_file(tmp_path: Path) -> None:
    s = load_settings(tmp_path / "missing.env", {})
    assert s.tier("light").model_path == EMBEDDED_DEFAULTS["LIGHT_MODEL_PATH"]
    # Any model path in the environment means the user configures tiers themselves.
    s = load_settings(tmp_path / "missing.env", {"HEAVY_MODEL_PATH": "/x.gguf"})
    assert not s.tier("light").configured and s.tier("heavy").configured


def test_unknown_tier_settings_are_kept_as_extras() -> None:
    assert parse_settings({"LIGHT_SOMETHING_NEW": "30"}).tier("light").extras == {"something_new": "30"}


def test_bad_setting_stops_the_server_with_one_line(start_service: StartService) -> None:
    proc = start_service({"LIGHT_MODEL_PATH": "/x.gguf", "LIGHT_N_CTX": "lots"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "llmservice: Invalid setting LIGHT_N_CTX='lots': Expected `int`, got `str`"


def test_a_low_max_tokens_limit_caps_the_default() -> None:
    settings = parse_settings({"MAX_TOKENS_LIMIT": "256", "LIGHT_MODEL_PATH": "a.gguf", "MEDIUM_N_CTX": "512"})
    assert settings.tier("light").max_tokens == settings.tier("medium").max_tokens == 256
    assert settings.tier("heavy").max_tokens == 256  # absent tiers too (a model may be loaded into them)
    with pytest.raises(SettingsError, match=r"LIGHT_MAX_TOKENS='512': above MAX_TOKENS_LIMIT=256"):
        parse_settings({"MAX_TOKENS_LIMIT": "256", "LIGHT_MAX_TOKENS": "512"})
