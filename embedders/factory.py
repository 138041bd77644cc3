"""Pick and build an embedding engine for a tier. Engine modules (torch, FlagEmbedding, llama.cpp)
are imported only when a tier uses them, never at import of this module.

Choice, first match wins:
1. EMBEDDING_ENGINE=bge_m3 | sentence_transformers | llamacpp (extras["engine"]);
2. a `.gguf` file → llamacpp;
3. a folder with `colbert_linear.pt` or `sparse_linear.pt`, or a repo id naming bge-m3 → bge_m3;
4. anything else → sentence_transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kernel.engines import EngineTable, engine_setting, import_engine

if TYPE_CHECKING:
    from embedders.base import Embedder
    from kernel.config import TierSettings

_ENGINES: EngineTable = {
    "bge_m3": ("embedders.bge_m3", "BgeM3Embedder", ("torch", "FlagEmbedding"), "embeddings"),
    "sentence_transformers": (
        "embedders.sentence_transformers",
        "SentenceTransformerEmbedder",
        ("torch", "sentence_transformers"),
        "embeddings",
    ),
    "llamacpp": ("embedders.llamacpp", "LlamaCppEmbedder", ("llama_cpp",), "llamacpp"),
}

_BGE_M3_FILES = ("colbert_linear.pt", "sparse_linear.pt")


def choose_embedder(tier: TierSettings, model_path: str) -> str:
    engine = engine_setting(tier, _ENGINES)
    if engine:
        return engine
    path = Path(model_path)
    if model_path.lower().endswith(".gguf") or path.is_file() or tier.backend == "llamacpp":
        return "llamacpp"
    if any((path / name).is_file() for name in _BGE_M3_FILES):
        return "bge_m3"
    if not path.exists() and "bge-m3" in model_path.lower():
        return "bge_m3"
    return "sentence_transformers"


def create_embedder(tier: TierSettings, model_path: str | Path) -> Embedder:
    """Build (not load) the tier's embedder; call `load()` on its worker thread."""
    model_path = str(model_path)
    engine = choose_embedder(tier, model_path)
    cls = import_engine(tier, _ENGINES, engine, "embedding")
    embedder: Embedder = cls(tier, model_path)
    return embedder
