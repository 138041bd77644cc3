"""The typed configuration an engine is built from: one tier's settings, parsed and checked by
`service.settings` (from `.env` and the environment) before any engine sees it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

Backend = Literal["auto", "llamacpp", "mlx", "remote"]
PassthroughApi = Literal["responses", "messages"]  # <TIER>_REMOTE_PASSTHROUGH values
KvType = Literal["f16", "q8_0", "q4_0"]  # llama.cpp KV cache element types (ggml names)
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Weight = Annotated[float, msgspec.Meta(ge=0.0)]
# A LoRA adapter's name: chosen per request as `model: "<tier>:<name>"`, so no ':' or '/' in it.
AdapterName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
MAX_ADAPTERS = 32  # per tier: each one holds memory in the engine

# Engines per family for <TIER>_ENGINE; the factories check the same names when they build one.
EMBEDDING_ENGINES = ("bge_m3", "sentence_transformers", "llamacpp")
RERANKER_ENGINES = ("cross_encoder", "flag", "embedding")


class TierSettings(msgspec.Struct, kw_only=True, frozen=True):
    name: str = ""
    model_path: str | None = None
    model_name: str | None = None
    backend: Backend = "auto"
    n_ctx: Positive = 4096
    n_batch: Positive = 512
    n_threads: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0 = let the engine choose
    n_gpu_layers: Annotated[int, msgspec.Meta(ge=-1)] = -1
    # Sampling defaults for requests that leave them out; None (not set): the model card's, else `Sampling`'s.
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    top_k: NonNeg | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    max_tokens: Positive = 1000
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    use_mmap: bool = True
    use_mlock: bool = False
    embedding_dimension: Annotated[int, msgspec.Meta(ge=1)] | None = None
    chat_template: str | None = None
    # llama.cpp: the multimodal projector GGUF that lets the model read images; unset: an
    # mmproj*.gguf beside the model file, as llama-server finds it
    mmproj_path: str | None = None
    max_queue: Positive = 16
    max_batch: Positive = 4  # requests an engine that can batch (MLX) decodes together
    preload: bool = True  # load at start (requests meanwhile get 503 + Retry-After); false: on first use
    keep_alive: NonNeg = 0  # unload after this many idle seconds; 0 = never
    micro_batch_size: Positive = 64  # embedding/reranker tiers: inputs coalesced into one engine call
    micro_batch_wait_ms: Annotated[float, msgspec.Meta(ge=0)] = 5.0  # how long a batch waits for company
    # Embedding/reranker tiers: padded tokens (rows x longest row) per engine call; inputs are packed by length.
    micro_batch_tokens: Positive = 8192
    token_ids: str = "cl100k_base"  # embedding input given as token ids: cl100k_base, o200k_base or model
    # Generation tiers: LoRA adapters by name -> path (`<TIER>_ADAPTERS=legal-qa=/a.gguf,chat=/b`).
    adapters: dict[AdapterName, str] = {}
    pin: bool = False  # never unloaded, neither when idle nor by POST /v1/models/{id}/unload
    # Generation tiers: the tier (a remote one, say) that takes the requests this one's full queue would refuse.
    overflow: str | None = None
    # Engine-specific options; service.settings refuses each one on tiers it does not apply to.
    prefix_cache_entries: NonNeg = 4  # MLX: KV caches of recent conversations kept for reuse
    # The prompt cache (backends.prompt_cache): server settings PROMPT_CACHE_*, copied into each
    # generation tier by service.settings (not settable per tier).
    prompt_cache_ram_bytes: NonNeg = 0
    prompt_cache_dir: str = ""
    prompt_cache_disk_bytes: NonNeg = 0
    # llama.cpp: the KV pool's total tokens, split evenly between the MAX_BATCH sequences;
    # 0 = N_CTX x MAX_BATCH, lowered to what fits the device's free memory
    kv_tokens: NonNeg = 0
    kv_type_k: KvType = "f16"  # llama.cpp: K cache type; q8_0 halves it, q4_0 quarters it
    kv_type_v: KvType = "f16"  # llama.cpp: V cache type; a quantized V needs flash attention
    flash_attn: Literal["auto", "on", "off"] = "auto"  # llama.cpp: auto = where the device supports it
    swa_full: bool = False  # llama.cpp: sliding-window layers keep every position (about 5x the KV on Gemma 3)
    tool_parser: Literal["auto", "hermes", "llama3", "mistral"] = "auto"  # how the model writes tool calls
    reasoning_parser: Literal["auto", "none", "think"] = "auto"  # where its thinking is (backends.reasoning)
    # llama.cpp: sample in the decode graph (llama_set_sampler); auto = when the model runs on a GPU.
    device_sampling: Literal["auto", "on", "off"] = "auto"
    # Speculative decoding: drafts verified in the batch's decode step (greedy output unchanged).
    speculative: Literal["off", "ngram", "draft"] = "off"
    draft_model_path: str | None = None  # `draft`: a small GGUF (llama.cpp) / MLX folder sharing the tokenizer
    draft_tokens: Positive = 8  # most tokens drafted per step; acceptance adapts it per sequence
    engine: str = ""  # embedding/reranker engine; "" = chosen from the model's files
    device: str = "auto"  # torch engines: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    batch_size: Positive = 32  # torch engines: inputs per forward pass
    # sentence-transformers and cross-encoder engines: run the transformer in torch, or exported once
    # to ONNX in onnxruntime (CPU only; faster there, above all for small batches); auto: onnx on a
    # CPU where the export works, else torch
    runtime: Literal["auto", "torch", "onnx"] = "auto"
    normalize: bool = True  # sentence-transformers: L2-normalise
    pooling: Literal["mean", "cls", "last", "model"] = "mean"  # llama.cpp embedders
    hybrid_weights: tuple[Weight, Weight, Weight] = (0.4, 0.2, 0.4)  # tier:<BGE-M3>: dense, sparse, ColBERT
    # BACKEND=remote: a pool of OpenAI-compatible servers (backends/remote.py) instead of a local model.
    remote_urls: str = ""  # comma-separated base URLs ending in /v1
    remote_model: str = ""  # the model name sent upstream; "" = each upstream's first in GET /v1/models
    remote_api_key: str = ""  # sent as `Authorization: Bearer`
    remote_timeout: Annotated[float, msgspec.Meta(gt=0)] = (
        60.0  # seconds to an upstream's first byte (and between chunks)
    )
    remote_max_inflight: Positive = 64  # requests at once per upstream
    remote_cooldown: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # seconds an ejected upstream stays out
    # The APIs whose requests go to the upstreams' own /v1/responses or /v1/messages as they are
    # (backends/remote_relay.py); () = every request translated onto the upstreams' chat completions.
    remote_passthrough: tuple[PassthroughApi, ...] = ()

    @property
    def configured(self) -> bool:
        return bool(self.model_path) or self.backend == "remote"

    @property
    def projector(self) -> str | None:
        """The projector GGUF this tier's model reads images through, if it has one: MMPROJ_PATH,
        else the first mmproj*.gguf beside a .gguf model file (llama-server's lookup)."""
        if self.mmproj_path:
            return self.mmproj_path
        if self.backend == "remote" or not self.model_path or not self.model_path.endswith(".gguf"):
            return None
        found = sorted(Path(self.model_path).parent.glob("mmproj*.gguf"))
        return str(found[0]) if found else None

    @property
    def reads_images(self) -> bool:
        """Whether this tier's model takes images: a GGUF with a projector, or an MLX model folder
        whose config.json has a vision tower (a VLM, which the MLX engine runs through mlx-vlm)."""
        if self.projector is not None:
            return True
        if self.backend not in ("auto", "mlx") or not self.model_path:
            return False
        return vision_folder(Path(self.model_path).expanduser())

    @property
    def upstreams(self) -> tuple[str, ...]:
        """`REMOTE_URLS` as a list, without trailing slashes."""
        return tuple(u.strip().rstrip("/") for u in self.remote_urls.split(",") if u.strip())


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")
SamplingSource = Literal["settings", "model card", "built-in"]


@dataclass(frozen=True, slots=True)
class Sampling:
    """The sampling values a request that sends none gets. The field defaults are the built-in ones."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.0  # off, as llama-server's

    @classmethod
    def resolve(cls, tier: TierSettings, card: Mapping[str, float]) -> tuple[Sampling, dict[str, SamplingSource]]:
        """Per field, llama-server's order: the tier's setting (set in `.env` or the environment),
        else the model card's (`Backend.info().sampling`), else the built-in value; and where each came from."""
        values: dict[str, Any] = {}
        sources: dict[str, SamplingSource] = {}
        for name in SAMPLING_FIELDS:
            if (value := getattr(tier, name)) is not None:
                values[name], sources[name] = value, "settings"
            elif name in card:
                values[name], sources[name] = card[name], "model card"
            else:
                sources[name] = "built-in"
        return cls(**values), sources


def vision_folder(folder: Path) -> bool:
    """A Hugging Face model folder of a vision-language model (its config names a vision tower)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("vision_config"))
