"""The catalogue: every model directly inside MODELS_DIR, described from its metadata without loading it.

An entry's id is a GGUF file's name without `.gguf` (a split GGUF: the first part's name without the
`-00001-of-0000N.gguf` suffix), or a folder's name. A projector (`mmproj-*.gguf`) is not a model: it
marks the model beside it as taking images. Folders are told apart by their files, as the engine
factories do: `config.json` with a `*ForSequenceClassification` architecture is a reranker; a
sentence-transformers or BGE-M3 folder is an embedder; a `quantization` section in `config.json`
marks MLX weights, anything else with a `config.json` is a Hugging Face folder.

GGUF metadata is read from the header's key/value section only (kernel.gguf): tensor data is never
touched, and arrays (the tokenizer's vocabulary) are skipped, not decoded, so a scan stays cheap.
`Catalogue.entries()` rescans only when MODELS_DIR's mtime changed (no watcher thread).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gguf import LlamaFileType

from kernel.gguf import GgufHeaderError, cached_gguf_header

Kind = Literal["generation", "embedding", "reranker"]
Format = Literal["gguf", "mlx", "hf"]

_SPLIT = re.compile(r"^(?P<base>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$", re.IGNORECASE)
_MMPROJ_PREFIX = re.compile(r"^mmproj(?:[-_.]|$)", re.IGNORECASE)
_DTYPE_SUFFIX = re.compile(r"[-_.](?:f16|f32|bf16|q\d\w*)$", re.IGNORECASE)
_EMBEDDING_FILES = ("modules.json", "config_sentence_transformers.json", "colbert_linear.pt", "sparse_linear.pt")
# GGUF architectures that only embed (llama.cpp's encoder-only models).
_EMBEDDING_ARCHS = ("bert", "nomic-bert", "jina-bert-v2", "modern-bert", "t5encoder")


@dataclass(frozen=True)
class CatalogueEntry:
    id: str
    path: str  # the file (a split GGUF's first part) or folder an engine opens
    kind: Kind
    format: Format
    size_bytes: int  # all parts / files, projector included
    quantisation: str | None = None
    context_length: int | None = None
    capabilities: tuple[str, ...] = ()
    projector: str | None = None
    architecture: str | None = None
    files: tuple[str, ...] = field(default=(), repr=False)


def _gguf_entry(model_id: str, parts: list[Path], projector: Path | None) -> CatalogueEntry | None:
    try:
        kv = cached_gguf_header(parts[0]).meta
    except (OSError, GgufHeaderError):
        return None  # a partial download or a foreign file: not listed
    arch = str(kv.get("general.architecture", "")) or None
    ctx = kv.get(f"{arch}.context_length") if arch else None
    quant: str | None = None
    file_type = kv.get("general.file_type")
    if isinstance(file_type, int):
        try:
            quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            quant = str(file_type)
    embeds = arch in _EMBEDDING_ARCHS or f"{arch}.pooling_type" in kv
    kind: Kind = "embedding" if embeds else "generation"
    caps = ["embeddings"] if embeds else ["completion", "chat"]  # chat: the service has template fallbacks
    if projector is not None:
        caps.append("vision")
    files = [*parts, *([projector] if projector else [])]
    return CatalogueEntry(
        id=model_id,
        path=str(parts[0]),
        kind=kind,
        format="gguf",
        size_bytes=sum(p.stat().st_size for p in files),
        quantisation=quant,
        context_length=int(ctx) if isinstance(ctx, int) else None,
        capabilities=tuple(caps),
        projector=str(projector) if projector else None,
        architecture=arch,
        files=tuple(str(p) for p in files),
    )


def _folder_entry(folder: Path) -> CatalogueEntry | None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    archs = [str(a) for a in config.get("architectures") or []]
    kind: Kind = "generation"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        kind = "reranker"
    elif any((folder / name).is_file() for name in _EMBEDDING_FILES) or any(
        a.endswith(("Model", "ForMaskedLM")) and not a.endswith("ForCausalLM") for a in archs
    ):
        kind = "embedding"
    quant_cfg = config.get("quantization") or config.get("quantization_config")
    fmt: Format = "mlx" if "quantization" in config else "hf"
    quant: str | None = None
    if isinstance(quant_cfg, dict):
        bits = quant_cfg.get("bits")
        quant = f"{bits}bit" if bits else str(quant_cfg.get("quant_method") or "") or None
    elif isinstance(config.get("torch_dtype"), str):
        quant = config["torch_dtype"]
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    ctx = text.get("max_position_embeddings") if isinstance(text, dict) else None
    caps = {"generation": ("completion", "chat"), "embedding": ("embeddings",), "reranker": ("rerank",)}[kind]
    if kind == "generation" and "vision_config" in config:
        caps = (*caps, "vision")
    files = [p for p in folder.rglob("*") if p.is_file()]
    return CatalogueEntry(
        id=folder.name,
        path=str(folder),
        kind=kind,
        format=fmt,
        size_bytes=sum(p.stat().st_size for p in files),
        quantisation=quant,
        context_length=int(ctx) if isinstance(ctx, int) else None,
        capabilities=caps,
        architecture=archs[0] if archs else None,
        files=tuple(str(p) for p in files),
    )


def scan(models_dir: str | Path) -> dict[str, CatalogueEntry]:
    """Every model directly inside `models_dir`, by id (an empty dict if the folder is missing)."""
    root = Path(models_dir)
    if not root.is_dir():
        return {}
    children = sorted(root.iterdir())
    ggufs = [p for p in children if p.is_file() and p.suffix.lower() == ".gguf" and not p.name.startswith(".")]
    projectors = [p for p in ggufs if p.name.lower().startswith("mmproj")]
    splits: dict[str, list[Path]] = {}
    singles: list[Path] = []
    for p in ggufs:
        if p in projectors:
            continue
        m = _SPLIT.match(p.name)
        if m:
            splits.setdefault(m["base"], []).append(p)
        else:
            singles.append(p)
    only_one = len(projectors) == 1 and len(singles) + len(splits) == 1

    # A projector belongs to the model its name carries (mmproj-<id>-f16.gguf); a lone projector
    # beside a lone model belongs to it; otherwise it is ambiguous and given to none.
    def projector_for(model_id: str) -> Path | None:
        named = [p for p in projectors if (base := _projector_base(p)) and model_id.lower().startswith(base)]
        if named:
            return max(named, key=lambda p: len(_projector_base(p)))
        return projectors[0] if only_one else None

    out: dict[str, CatalogueEntry] = {}
    for p in singles:
        entry = _gguf_entry(p.stem, [p], projector_for(p.stem))
        if entry:
            out[entry.id] = entry
    for base, parts in splits.items():
        parts.sort()
        total = int(_SPLIT.match(parts[0].name)["total"])  # type: ignore[index]
        if len(parts) != total or not parts[0].name.lower().endswith(f"-00001-of-{total:05d}.gguf"):
            continue  # incomplete split: not loadable yet
        entry = _gguf_entry(base, parts, projector_for(base))
        if entry:
            out[entry.id] = entry
    for p in children:
        if p.is_dir() and not p.name.startswith("."):
            entry = _folder_entry(p)
            if entry and entry.id not in out:
                out[entry.id] = entry
    return out


def _projector_base(projector: Path) -> str:
    """The model name a projector carries: `mmproj-Qwen2.5-VL-3B-Instruct-f16.gguf` -> `qwen2.5-vl-3b-instruct`."""
    core = _MMPROJ_PREFIX.sub("", projector.stem)
    return _DTYPE_SUFFIX.sub("", core).lower()


class Catalogue:
    """MODELS_DIR's entries, rescanned on read when the folder's mtime (or its existence) changed.

    Adding, removing or renaming a model inside MODELS_DIR changes its mtime; a file rewritten in
    place does not, which is why downloads are written beside and renamed into place."""

    def __init__(self, models_dir: str) -> None:
        self.models_dir = models_dir
        self._lock = threading.Lock()
        self._stamp: int | None = None
        self._entries: dict[str, CatalogueEntry] = {}

    def entries(self) -> dict[str, CatalogueEntry]:
        if not self.models_dir:
            return {}
        try:
            stamp: int | None = Path(self.models_dir).stat().st_mtime_ns
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp or stamp is None:
                self._entries = scan(self.models_dir) if stamp is not None else {}
                self._stamp = stamp
            return self._entries

    def get(self, model_id: str) -> CatalogueEntry | None:
        return self.entries().get(model_id)
