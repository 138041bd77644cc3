"""Dense embeddings from a GGUF model with llama-cpp-python (`Llama(embedding=True)`).

Pooling: EMBEDDING_POOLING=mean (default: a generative GGUF such as Gemma declares none, and
llama.cpp would then return one vector per token), cls, last (Qwen3-Embedding style), or model
(use what the GGUF declares, e.g. for nomic/bge GGUF conversions).
Each text must fit one batch: inputs are truncated to min(N_CTX, N_BATCH) tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedders.base import Embedder, EmbedderInfo, EmbeddingOutput, l2_normalize
from kernel.errors import InvalidRequestError, ModelUnavailableError, engine_errors

if TYPE_CHECKING:
    from kernel.config import TierSettings


class LlamaCppEmbedder(Embedder):
    name = "llamacpp"

    def __init__(self, tier: TierSettings, model_path: str) -> None:
        super().__init__()
        self.tier = tier
        self.model_path = model_path
        self._pooling = tier.pooling
        self._llm: Any = None
        self._info: EmbedderInfo | None = None

    def load(self) -> None:
        if not Path(self.model_path).is_file():
            raise ModelUnavailableError(f"The GGUF file does not exist: {self.model_path}")
        import llama_cpp

        pooling = {
            "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
            "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
            "model": llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED,
        }[self._pooling]
        # Non-causal encoders need a whole sequence in one micro-batch: n_ubatch = n_batch.
        n_batch = min(self.tier.n_batch, self.tier.n_ctx)
        try:
            llm = llama_cpp.Llama(
                model_path=self.model_path,
                embedding=True,
                pooling_type=pooling,
                n_ctx=self.tier.n_ctx,
                n_batch=n_batch,
                n_ubatch=n_batch,
                n_threads=self.tier.n_threads or None,
                n_gpu_layers=self.tier.n_gpu_layers,
                use_mmap=self.tier.use_mmap,
                use_mlock=self.tier.use_mlock,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelUnavailableError(f"llama.cpp cannot load {self.model_path}: {exc}") from exc
        if int(llm.pooling_type()) == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            llm.close()
            raise ModelUnavailableError(
                f"{self.model_path} declares no pooling; set {self.tier.name.upper()}_POOLING=mean"
            )
        dimension = int(llm.n_embd())
        try:
            self.check_configured_dimension(self.tier.embedding_dimension, dimension, self.model_path)
        except ModelUnavailableError:
            llm.close()
            raise
        self._llm = llm
        self._info = EmbedderInfo(
            engine=self.name,
            dimension=dimension,
            max_tokens=n_batch,
            capabilities=frozenset({"dense"}),
            # A model that adds BOS still has one token to embed for ""; one that does not has none.
            embeds_empty=len(llm.tokenize(b"", add_bos=True)) > 0,
            extras={"pooling": self._pooling, "n_ctx": self.tier.n_ctx},
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
            # llama.cpp packs several sequences into one decode up to n_batch tokens.
            vectors = self._llm.embed(texts, normalize=False, truncate=True)
        matrix = l2_normalize(np.asarray(vectors, dtype=np.float32))
        tokens = self.count_tokens(texts)
        return [
            EmbeddingOutput(tokens=min(n, info.max_tokens), dense=vec) for n, vec in zip(tokens, matrix, strict=True)
        ]

    def count_tokens(self, texts: list[str]) -> list[int]:
        self.info()
        return [len(self._llm.tokenize(t.encode("utf-8"), add_bos=True)) for t in texts]

    def decode_tokens(self, ids: list[int]) -> str:
        self.info()
        size = int(self._llm.n_vocab())
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise InvalidRequestError(
                f"Token id {bad[0]} is outside this model's vocabulary (0..{size - 1})", param="input"
            )
        # A BOS the client included would otherwise come back as text and be added twice.
        text: str = self._llm.detokenize(ids, special=False).decode("utf-8", errors="replace")
        return text

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
        self._llm = None
        self._info = None
