from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from backends.base import card_sampling
from kernel.config import SAMPLING_FIELDS, Sampling, TierSettings
from service.settings import (
    EMBEDDED_DEFAULTS,
    GENERATION_TIERS,
    TIERS,
    SettingsError,
    load_settings,
    parse_settings,
    with_variables,
)

if TYPE_CHECKING:
    from tests.conftest import StartService

FIELDS = ["MODEL_PATH", "BACKEND", "N_CTX", "N_BATCH", "N_THREADS", "N_GPU_LAYERS", "USE_MMAP", "USE_MLOCK"]
SAMPLING = ["TEMPERATURE", "TOP_P", "TOP_K", "MAX_TOKENS", "REPEAT_PENALTY"]  # generation tiers only
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
    }
    env = {f"{t.upper()}_{k}": v for t in TIERS for k, v in values.items() if k in FIELDS or t in GENERATION_TIERS}
    env |= {"EMBEDDING_EMBEDDING_DIMENSION": "1024", "EMBEDDING_DEVICE": "cuda:1", "RERANKER_ENGINE": "flag"}
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
        assert (t.n_ctx, t.n_batch, t.n_threads, t.n_gpu_layers, t.backend) == (8192, 256, 8, -1, "llamacpp")
        assert (t.use_mmap, t.use_mlock) == (False, True)
        if tier in GENERATION_TIERS:
            assert (t.temperature, t.top_k, t.max_tokens, t.repeat_penalty) == (0.2, 20, 64, 1.05)
    assert s.tier("embedding").embedding_dimension == 1024 and s.tier("embedding").device == "cuda:1"
    assert s.tier("reranker").engine == "flag"


def test_example_file_documents_every_tier_variable() -> None:
    text = EXAMPLE.read_text()
    for tier in TIERS:
        for field in FIELDS + (SAMPLING if tier in GENERATION_TIERS else []):
            assert f"{tier.upper()}_{field}=" in text, f"{tier.upper()}_{field} is not in .env.example"
    # Every variable the example sets, commented out or not, is one the server knows for that tier.
    assigned = re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=([^\s#]*)", text, re.MULTILINE)
    env = {key: value for key, value in assigned if value}
    assert len(env) > 40
    parse_settings(env)


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
        ({"LIGHT_PREFIX_CACHE_ENTRIES": "many"}, "LIGHT_PREFIX_CACHE_ENTRIES"),
        ({"RERANKER_HYBRID_WEIGHTS": "1,2"}, "RERANKER_HYBRID_WEIGHTS"),
        ({"RERANKER_HYBRID_WEIGHTS": "0,0,0"}, "RERANKER_HYBRID_WEIGHTS"),
        ({"RERANKER_HYBRID_WEIGHTS": "1,-1,1"}, "RERANKER_HYBRID_WEIGHTS"),
        ({"EMBEDDING_ENGINE": "onnx"}, "EMBEDDING_ENGINE"),
        ({"RERANKER_ENGINE": "bge_m3"}, "RERANKER_ENGINE"),
        ({"EMBEDDING_DEVICE": "gpu"}, "EMBEDDING_DEVICE"),
        ({"EMBEDDING_POOLING": "max"}, "EMBEDDING_POOLING"),
        ({"LIGHT_KV_TOKENS": "-1"}, "LIGHT_KV_TOKENS"),
        ({"LIGHT_KV_TYPE_K": "q5_1"}, "LIGHT_KV_TYPE_K"),
        ({"MEDIUM_FLASH_ATTN": "sometimes"}, "MEDIUM_FLASH_ATTN"),
        ({"LIGHT_SWA_FULL": "maybe"}, "LIGHT_SWA_FULL"),
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


def test_kv_cache_settings() -> None:
    tier = parse_settings(
        {"LIGHT_KV_TOKENS": "8192", "LIGHT_KV_TYPE_K": "Q8_0", "LIGHT_KV_TYPE_V": "q4_0", "LIGHT_FLASH_ATTN": "on"}
    ).tiers["light"]
    assert (tier.kv_tokens, tier.kv_type_k, tier.kv_type_v, tier.flash_attn) == (8192, "q8_0", "q4_0", "on")
    assert parse_settings({"LIGHT_FLASH_ATTN": "off"}).tiers["light"].flash_attn == "off"
    # on/off also read as booleans elsewhere: both auto/on/off switches keep their words.
    assert parse_settings({"LIGHT_DEVICE_SAMPLING": "On"}).tiers["light"].device_sampling == "on"
    assert parse_settings({"LIGHT_DEVICE_SAMPLING": "off"}).tiers["light"].device_sampling == "off"
    with pytest.raises(SettingsError, match="expected one of: f16, q8_0, q4_0"):
        parse_settings({"LIGHT_KV_TYPE_V": "q5_1"})
    # llama.cpp reads a quantized V only through flash attention: refused, with what to change.
    with pytest.raises(SettingsError, match="LIGHT_KV_TYPE_V='q8_0': a quantized V cache needs flash attention"):
        parse_settings({"LIGHT_KV_TYPE_V": "q8_0", "LIGHT_FLASH_ATTN": "off"})
    with pytest.raises(SettingsError, match="does not apply to the embedding tier"):
        parse_settings({"EMBEDDING_KV_TOKENS": "4096"})


def test_prompt_cache_budgets_take_sizes_with_units() -> None:
    env = {"LIGHT_MODEL_PATH": "m.gguf", "PROMPT_CACHE_RAM_BYTES": "8GiB", "PROMPT_CACHE_DISK_BYTES": "1.5GB"}
    settings = parse_settings(env)
    assert (settings.prompt_cache_ram_bytes, settings.prompt_cache_disk_bytes) == (8 * 2**30, 1_500_000_000)
    assert settings.tiers["light"].prompt_cache_ram_bytes == 8 * 2**30  # copied into each tier
    assert parse_settings({"PROMPT_CACHE_RAM_BYTES": "4096"}).prompt_cache_ram_bytes == 4096
    with pytest.raises(SettingsError, match="PROMPT_CACHE_DISK_BYTES='lots'"):
        parse_settings({"PROMPT_CACHE_DISK_BYTES": "lots"})


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


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LIGHT_N_CTXX": "8192"}, "Unknown setting LIGHT_N_CTXX; did you mean LIGHT_N_CTX?"),
        ({"EMBEDING_MODEL_PATH": "/m"}, "Unknown setting EMBEDING_MODEL_PATH; did you mean EMBEDDING_MODEL_PATH?"),
        ({"ENABLE_CACHEE": "true"}, "Unknown setting ENABLE_CACHEE; did you mean ENABLE_CACHE?"),
        ({"LIGHT_POOLING": "cls"}, "Setting LIGHT_POOLING does not apply to the light tier (only to: embedding)"),
        ({"EMBEDDING_TEMPERATURE": "0"}, "does not apply to the embedding tier"),
    ],
)
def test_unknown_settings_stop_start_up(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as err:
        parse_settings(env)
    assert message in str(err.value)


def test_env_file_keys_must_be_known_but_foreign_tools_are_allowed(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("HF_HOME=/hf\nCUDA_VISIBLE_DEVICES=0\nLLMSERVICE_EXTRAS=llamacpp\nLIGHT_N_CTX=1024\n")
    assert load_settings(env_file, {}).tier("light").n_ctx == 1024
    env_file.write_text("LIGHT_N_CTX=1024\nCACHE_TTL=5\n")
    with pytest.raises(SettingsError, match="Unknown setting CACHE_TTL; did you mean CACHE_TTL_SECONDS"):
        load_settings(env_file, {})


def test_environment_typos_fail_but_unrelated_variables_pass(tmp_path: Path) -> None:
    missing = tmp_path / "missing.env"
    assert load_settings(missing, {"HOSTNAME": "box", "API_URL": "x", "LOGNAME": "me"}).port == 8000
    with pytest.raises(SettingsError, match="LIGHT_N_CTXX"):
        load_settings(missing, {"LIGHT_N_CTXX": "8192"})
    with pytest.raises(SettingsError, match="did you mean CORS_ORIGINS"):
        load_settings(missing, {"CORS_ORIGIN": "http://localhost"})


def test_engine_names_match_the_factories() -> None:
    from embedders.factory import _ENGINES as EMBEDDERS
    from rerankers.factory import _ENGINES as RERANKERS
    from service.settings import EMBEDDING_ENGINES, RERANKER_ENGINES

    assert set(EMBEDDERS) == set(EMBEDDING_ENGINES) and set(RERANKERS) == set(RERANKER_ENGINES)


def test_bad_setting_stops_the_server_with_one_line(start_service: StartService) -> None:
    proc = start_service({"LIGHT_MODEL_PATH": "/x.gguf", "LIGHT_N_CTX": "lots"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "llmservice: Invalid setting LIGHT_N_CTX='lots': Expected `int`, got `str`"


def test_auto_device_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from embedders.options import torch_device
    from kernel.config import TierSettings

    tier = TierSettings(name="embedding")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert torch_device(tier) == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert torch_device(tier) == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device(tier) == "cuda"
    assert torch_device(TierSettings(name="embedding", device="cpu")) == "cpu"


def test_typo_stops_the_server_naming_the_closest_setting(start_service: StartService) -> None:
    proc = start_service({"LIGHT_MODEL_PATH": "/x.gguf", "LIGHT_N_CTXX": "8192"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "llmservice: Unknown setting LIGHT_N_CTXX; did you mean LIGHT_N_CTX?"


def test_a_low_max_tokens_limit_caps_the_default() -> None:
    settings = parse_settings({"MAX_TOKENS_LIMIT": "256", "LIGHT_MODEL_PATH": "a.gguf", "MEDIUM_N_CTX": "512"})
    assert settings.tier("light").max_tokens == settings.tier("medium").max_tokens == 256
    assert settings.tier("heavy").max_tokens == 256  # absent tiers too (a model may be loaded into them)
    with pytest.raises(SettingsError, match=r"LIGHT_MAX_TOKENS='512': above MAX_TOKENS_LIMIT=256"):
        parse_settings({"MAX_TOKENS_LIMIT": "256", "LIGHT_MAX_TOKENS": "512"})


def test_adapters_parse_per_generation_tier() -> None:
    s = parse_settings({"LIGHT_ADAPTERS": "legal-qa=/a/legal.gguf, chat.v2 = ~/b ,"})
    assert s.tier("light").adapters == {"legal-qa": "/a/legal.gguf", "chat.v2": "~/b"}
    assert s.tier("medium").adapters == {}


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"LIGHT_ADAPTERS": "legal-qa"}, "name=path"),
        ({"LIGHT_ADAPTERS": "a=/x,a=/y"}, "named twice"),
        ({"LIGHT_ADAPTERS": "bad:name=/x"}, "LIGHT_ADAPTERS"),  # ':' would split `model: tier:adapter`
        ({"LIGHT_ADAPTERS": "../up=/x"}, "LIGHT_ADAPTERS"),
        ({"LIGHT_ADAPTERS": ",".join(f"a{i}=/x" for i in range(33))}, "at most 32"),
        ({"EMBEDDING_ADAPTERS": "a=/x"}, "does not apply"),
    ],
)
def test_bad_adapters_setting(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(fragment)):
        parse_settings(env)


def test_repeat_penalty_is_off_by_default() -> None:
    """llama-server's default: a penalty costs a scan per token and changes what greedy answers."""
    s = parse_settings({"LIGHT_MODEL_PATH": "/m.gguf"})
    assert Sampling.resolve(s.tier("light"), {})[0].repeat_penalty == 1.0


def test_sampling_defaults_come_from_settings_then_the_card_then_built_in() -> None:
    """Only what the user set counts as set (even a value equal to the built-in one), so a model
    card's value applies to everything else, as in llama-server."""
    tier = parse_settings({"LIGHT_MODEL_PATH": "/m.gguf", "LIGHT_TEMPERATURE": "0.7", "LIGHT_TOP_K": "0"}).tier("light")
    assert (tier.temperature, tier.top_k, tier.top_p, tier.min_p, tier.repeat_penalty) == (0.7, 0, None, None, None)
    card = {"temperature": 0.1, "top_k": 20, "top_p": 0.8}
    values, sources = Sampling.resolve(tier, card)
    assert values == Sampling(temperature=0.7, top_p=0.8, top_k=0, min_p=0.0, repeat_penalty=1.0)
    assert sources == {
        "temperature": "settings",
        "top_p": "model card",
        "top_k": "settings",
        "min_p": "built-in",
        "repeat_penalty": "built-in",
    }
    assert Sampling.resolve(TierSettings(), {}) == (Sampling(), dict.fromkeys(SAMPLING_FIELDS, "built-in"))


def test_a_set_sampling_value_survives_a_runtime_change() -> None:
    """PATCH /v1/config re-parses the settings as variables: a value set equal to the built-in one
    stays set (it would otherwise yield to the card after any change)."""
    s = parse_settings({"LIGHT_MODEL_PATH": "/m.gguf", "LIGHT_TEMPERATURE": "0.7"})
    changed = with_variables(s, {"LIGHT_TOP_K": "5"}).tier("light")
    assert (changed.temperature, changed.top_k, changed.top_p) == (0.7, 5, None)


@pytest.mark.parametrize(
    ("raw", "card"),
    [
        # GGUF metadata arrives as text, as llama.cpp prints it; generation_config.json as numbers.
        ({"temperature": "0.600000", "top_k": "20", "top_p": None}, {"temperature": 0.6, "top_k": 20}),
        ({"temperature": 1, "top_p": 0.95, "min_p": 0, "repeat_penalty": 1.1}, {"temperature": 1.0, "top_p": 0.95,
          "min_p": 0.0, "repeat_penalty": 1.1}),
        # Out of the settings' bounds or not a number: left out, the rest kept.
        ({"temperature": 5.0, "top_p": "high", "top_k": -1, "repeat_penalty": 0, "min_p": 0.05}, {"min_p": 0.05}),
    ],
)  # fmt: skip
def test_a_model_cards_values_are_checked_like_the_settings(raw: dict[str, object], card: dict[str, float]) -> None:
    checked = card_sampling(raw, "test")
    assert checked == card
    assert type(checked.get("top_k", 0)) is int  # a count, as the sampler takes it


def test_remote_tier_settings(tmp_path: Path) -> None:
    env = {
        "HEAVY_BACKEND": "remote",
        "HEAVY_REMOTE_URLS": "http://gpu-1:8000/v1/, http://gpu-2:8000/v1",
        "HEAVY_REMOTE_MODEL": "Qwen/Qwen3-32B",
        "HEAVY_REMOTE_TIMEOUT": "30",
        "HEAVY_REMOTE_MAX_INFLIGHT": "128",
        "HEAVY_REMOTE_COOLDOWN": "5",
    }
    heavy = parse_settings(env).tier("heavy")
    assert heavy.configured and heavy.upstreams == ("http://gpu-1:8000/v1", "http://gpu-2:8000/v1")
    assert (heavy.remote_model, heavy.remote_timeout, heavy.remote_max_inflight, heavy.remote_cooldown) == (
        "Qwen/Qwen3-32B",
        30,
        128,
        5,
    )
    # A remote tier names a model: the embedded defaults stay out, as for a MODEL_PATH.
    s = load_settings(tmp_path / "missing.env", env)
    assert not s.tier("light").configured and s.tier("heavy").configured


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"LIGHT_BACKEND": "remote"}, "LIGHT_BACKEND=remote needs LIGHT_REMOTE_URLS"),
        ({"LIGHT_REMOTE_URLS": "http://x/v1"}, "LIGHT_REMOTE_URLS is set but LIGHT_BACKEND is auto"),
        (
            {"LIGHT_BACKEND": "remote", "LIGHT_REMOTE_URLS": "http://x/v1", "LIGHT_MODEL_PATH": "/m.gguf"},
            "LIGHT_MODEL_PATH does not apply to a remote tier",
        ),
        ({"EMBEDDING_BACKEND": "remote"}, "EMBEDDING_BACKEND=remote needs EMBEDDING_REMOTE_URLS"),
        ({"RERANKER_REMOTE_URLS": "http://x/v1"}, "RERANKER_REMOTE_URLS is set but RERANKER_BACKEND is auto"),
        ({"LIGHT_REMOTE_TIMEOUT": "0"}, "LIGHT_REMOTE_TIMEOUT"),
    ],
)
def test_bad_remote_settings(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(fragment)):
        parse_settings(env)
