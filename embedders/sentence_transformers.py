"""Dense embeddings with sentence-transformers (MiniLM, BGE, E5, GTE... any ST folder)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from embedders import _hf
from embedders.base import Embedder, EmbedderInfo, EmbeddingOutput, l2_normalize, require_local_model
from embedders.options import extra_bool, extra_int, set_torch_threads, torch_device
from service.errors import ModelUnavailableError, engine_errors

if TYPE_CHECKING:
    from service.settings import TierSettings


class SentenceTransformerEmbedder(Embedder):
    name = "sentence_transformers"

    def __init__(self, tier: TierSettings, model_path: str) -> None:
        super().__init__()
        self.tier = tier
        self.model_path = model_path
        self._device = torch_device(tier)
        self._batch_size = extra_int(tier, "batch_size", 32)
        # OpenAI clients assume unit vectors (cosine == dot); opt out for dot-product models.
        self._normalize = extra_bool(tier, "normalize", True)
        self._model: Any = None
        self._info: EmbedderInfo | None = None

    def load(self) -> None:
        path = require_local_model(self.model_path, "sentence-transformers")
        set_torch_threads(self.tier.n_threads)
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(path, device=self._device)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelUnavailableError(f"Cannot load {path} with sentence-transformers: {exc}") from exc
        dimension = model.get_embedding_dimension()
        if not dimension:
            raise ModelUnavailableError(f"{path} does not declare its embedding dimension")
        self.check_configured_dimension(self.tier.embedding_dimension, dimension, path)
        max_tokens = min(model.get_max_seq_length() or 512, self.tier.n_ctx)
        model.max_seq_length = max_tokens
        self._model = model
        self._info = EmbedderInfo(
            engine=self.name,
            dimension=int(dimension),
            max_tokens=max_tokens,
            capabilities=frozenset({"dense"}),
            embeds_empty=True,  # [CLS] [SEP] still yields a vector
            device=self._device,
        )

    def info(self) -> EmbedderInfo:
        if self._info is None:
            raise ModelUnavailableError("The embedding model is not loaded")
        return self._info

    def embed(
        self, texts: list[str], *, dense: bool = True, sparse: bool = False, colbert: bool = False
    ) -> list[EmbeddingOutput]:
        self.check_outputs(dense=dense, sparse=sparse, colbert=colbert)
        info = self.info()
        if not texts:
            return []
        with engine_errors(self.name):
            vectors = self._model.encode(
                texts,
                batch_size=self._batch_size,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        vectors = np.asarray(vectors, dtype=np.float32)
        if self._normalize:
            vectors = l2_normalize(vectors)
        tokens = self.count_tokens(texts)
        return [
            EmbeddingOutput(tokens=min(n, info.max_tokens), dense=vec) for n, vec in zip(tokens, vectors, strict=True)
        ]

    def count_tokens(self, texts: list[str]) -> list[int]:
        self.info()
        return _hf.count_tokens(self._model.tokenizer, texts)

    def decode_tokens(self, ids: list[int]) -> str:
        self.info()
        return _hf.decode_tokens(self._model.tokenizer, ids)

    def close(self) -> None:
        self._model = None
        self._info = None
