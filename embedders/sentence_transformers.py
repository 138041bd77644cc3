"""Dense embeddings with sentence-transformers (MiniLM, BGE, E5, GTE... any ST folder)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from embedders import hf
from embedders.base import Embedder, EmbedderInfo, EmbeddingOutput, l2_normalize
from embedders.torch_engine import TorchEngine
from kernel.errors import ModelUnavailableError, engine_errors

if TYPE_CHECKING:
    from kernel.config import TierSettings


class SentenceTransformerEmbedder(TorchEngine[EmbedderInfo], Embedder):
    name = "sentence_transformers"
    model_kind = "embedding"

    def __init__(self, tier: TierSettings, model_path: str) -> None:
        super().__init__(tier, model_path)
        # OpenAI clients assume unit vectors (cosine == dot); opt out for dot-product models.
        self._normalize = tier.normalize

    def load(self) -> None:
        path = self._begin_load("sentence-transformers")
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
        return hf.count_tokens(self._model.tokenizer, texts)

    def decode_tokens(self, ids: list[int]) -> str:
        self.info()
        return hf.decode_tokens(self._model.tokenizer, ids)
