"""Pick and build a reranker for a tier. Engine modules are imported only when a tier uses them.

Choice, first match wins:
1. MODEL_PATH `tier:<name>` → EmbeddingReranker over that tier's embedder (`embedder_provider`);
2. RERANKER_ENGINE=cross_encoder | flag | embedding (extras["engine"]);
3. anything else → cross_encoder (sentence-transformers `CrossEncoder`). It loads BAAI's
   bge-reranker folders too and gives FlagReranker's logits in a third to a half of the time: one forward
   pass per batch where `compute_score` runs its first batch twice, onnxruntime on a CPU, and the
   last layer for the first token only (rerankers.first_token). `flag` stays for FlagEmbedding's
   own truncation (the query keeps at most 3/4 of the tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kernel.engines import EngineTable, engine_setting, import_engine
from kernel.errors import ModelUnavailableError

if TYPE_CHECKING:
    from embedders.base import Embedder
    from kernel.config import TierSettings
    from rerankers.base import Reranker

_ENGINES: EngineTable = {
    "cross_encoder": (
        "rerankers.cross_encoder",
        "CrossEncoderReranker",
        ("torch", "sentence_transformers"),
        "embeddings",
    ),
    "flag": ("rerankers.flag", "FlagRerankerReranker", ("torch", "FlagEmbedding"), "embeddings"),
    "embedding": ("rerankers.embedding", "EmbeddingReranker", (), "embeddings"),
}


def choose_reranker(tier: TierSettings, model_path: str) -> str:
    if model_path.startswith("tier:"):
        return "embedding"
    return engine_setting(tier, _ENGINES) or "cross_encoder"


def create_reranker(
    tier: TierSettings, model_path: str | Path, embedder_provider: Callable[[], Embedder] | None = None
) -> Reranker:
    """Build (not load) the tier's reranker; call `load()` on its worker thread.

    `embedder_provider` returns the loaded embedder of the tier named by `tier:<name>`."""
    model_path = str(model_path)
    engine = choose_reranker(tier, model_path)
    cls = import_engine(tier, _ENGINES, engine, "reranker")
    if engine == "embedding":
        if embedder_provider is None:
            raise ModelUnavailableError(
                f"Tier {tier.name} reranks with {model_path}, but no embedding tier is available to it"
            )
        reranker: Reranker = cls(tier, embedder_provider)
    else:
        reranker = cls(tier, model_path)
    return reranker
