"""BGE-M3 through FlagEmbedding: dense, sparse (lexical weights) and ColBERT vectors in one pass.

`BGEM3FlagModel` loads the encoder and its three heads. We run its forward ourselves, once per
chunk of texts, because `BGEM3FlagModel.encode()` runs the first batch through the encoder twice
(a batch-size probe: measured 2 forwards per call, ~1.6x the time of one) and draws tqdm bars
whenever a call holds a full batch. The post-processing mirrors `encode()`'s (positive weights,
max per token id, special tokens dropped; no ColBERT vector for <s>) and a test checks that both
give the same vectors. If FlagEmbedding's internals change shape, we fall back to `encode()`.
Texts are tokenised on the request side (`PreTokenizing`): the model thread only runs forwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from embedders import hf
from embedders.base import (
    Embedder,
    EmbedderInfo,
    EmbeddingOutput,
    PreTokenizing,
    hf_max_tokens,
    padded_batches,
    request_tokenizer,
)
from embedders.torch_engine import TorchEngine
from kernel.errors import ModelUnavailableError, engine_errors

if TYPE_CHECKING:
    from kernel.config import TierSettings


class BgeM3Embedder(TorchEngine[EmbedderInfo], Embedder, PreTokenizing):
    name = "bge_m3"
    model_kind = "embedding"

    def __init__(self, tier: TierSettings, model_path: str) -> None:
        super().__init__(tier, model_path)
        self._direct = False
        self._special_ids: frozenset[int] = frozenset()
        self._request_tokenizer: Any = None
        self._pad_id = 0

    def load(self) -> None:
        path = self._begin_load("BGE-M3")
        from FlagEmbedding import BGEM3FlagModel  # ~10 s: datasets, peft, pandas

        max_tokens = hf_max_tokens(path, cap=self.tier.n_ctx)
        try:
            model = BGEM3FlagModel(
                path,
                use_fp16=False,
                devices=self._device,
                normalize_embeddings=True,
                batch_size=self._batch_size,
                query_max_length=max_tokens,
                passage_max_length=max_tokens,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelUnavailableError(f"Cannot load {path} as BGE-M3: {exc}") from exc
        heads = model.model  # the dense/sparse/ColBERT heads on top of the XLM-R encoder
        dimension = int(heads.model.config.hidden_size)
        self.check_configured_dimension(self.tier.embedding_dimension, dimension, path)
        tokenizer = model.tokenizer
        special = (tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
        self._special_ids = frozenset(t for t in special if t is not None)
        self._direct = (
            callable(heads)
            and getattr(tokenizer, "is_fast", False)
            and all(hasattr(heads, name) for name in ("colbert_linear", "sparse_linear", "normalize_embeddings"))
        )
        if self._direct:
            heads.float().to(self._device).eval()  # what encode() does before every call
            self._request_tokenizer = request_tokenizer(tokenizer, max_tokens)
            self._pad_id = int(tokenizer.pad_token_id or 0)
        self._model = model
        self._info = EmbedderInfo(
            engine=self.name,
            dimension=dimension,
            max_tokens=max_tokens,
            capabilities=frozenset({"dense", "sparse", "colbert"}),
            embeds_empty=True,  # <s></s>: a dense vector, an empty sparse dict, one ColBERT vector
            device=self._device,
            extras={"colbert_dimension": int(heads.colbert_linear.out_features), "direct_forward": self._direct},
        )

    def embed(
        self, texts: list[str], *, dense: bool = True, sparse: bool = False, colbert: bool = False
    ) -> list[EmbeddingOutput]:
        self.check_outputs(dense=dense, sparse=sparse, colbert=colbert)
        self.info()
        if not texts:
            return []
        if self._direct:
            return self.embed_tokens(self.tokenize(texts), dense=dense, sparse=sparse, colbert=colbert)
        with engine_errors(self.name):
            return self._embed_encode(texts, dense=dense, sparse=sparse, colbert=colbert)

    @property
    def pretokenizes(self) -> bool:
        return self._direct

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        self.info()
        if not texts:
            return []
        return [e.ids for e in self._request_tokenizer.encode_batch(texts)]

    def embed_tokens(
        self, ids: list[list[int]], *, dense: bool = True, sparse: bool = False, colbert: bool = False
    ) -> list[EmbeddingOutput]:
        import torch

        self.check_outputs(dense=dense, sparse=sparse, colbert=colbert)
        self.info()
        heads = self._model.model
        results: list[EmbeddingOutput | None] = [None] * len(ids)
        with engine_errors(self.name):
            for chunk, input_ids, mask in padded_batches(ids, self._batch_size, self._pad_id, self._pass_tokens):
                features = {
                    "input_ids": torch.from_numpy(input_ids).to(self._device),
                    "attention_mask": torch.from_numpy(mask).to(self._device),
                }
                with torch.inference_mode():
                    out = heads(features, return_dense=dense, return_sparse=sparse, return_colbert_vecs=colbert)
                dense_np = out["dense_vecs"].float().cpu().numpy() if dense else None
                weights_np = out["sparse_vecs"].squeeze(-1).float().cpu().numpy() if sparse else None
                colbert_np = out["colbert_vecs"].float().cpu().numpy() if colbert else None
                for row, i in enumerate(chunk):
                    n = len(ids[i])
                    result = EmbeddingOutput(tokens=n)
                    if dense_np is not None:
                        result.dense = dense_np[row]
                    if weights_np is not None:
                        result.sparse = self._lexical_weights(ids[i], weights_np[row, :n])
                    if colbert_np is not None:
                        result.colbert = colbert_np[row, : n - 1]  # the heads skip <s>
                    results[i] = result
        return [r for r in results if r is not None]

    def _lexical_weights(self, ids: list[int], weights: npt.NDArray[np.float32]) -> dict[str, float]:
        lexical: dict[str, float] = {}
        for token, weight in zip(ids, weights.tolist(), strict=True):
            if token in self._special_ids or weight <= 0:
                continue
            key = str(token)
            if weight > lexical.get(key, 0.0):
                lexical[key] = float(weight)
        return lexical

    def _embed_encode(self, texts: list[str], *, dense: bool, sparse: bool, colbert: bool) -> list[EmbeddingOutput]:
        info = self.info()
        results: list[EmbeddingOutput] = []
        for start in range(0, len(texts), self._batch_size):
            chunk = texts[start : start + self._batch_size]
            # batch_size > len(chunk): FlagEmbedding draws progress bars for full batches.
            out = self._model.encode(
                chunk,
                batch_size=len(chunk) + 1,
                max_length=info.max_tokens,
                return_dense=dense,
                return_sparse=sparse,
                return_colbert_vecs=colbert,
            )
            tokens = self.count_tokens(chunk)
            for i, n in enumerate(tokens):
                result = EmbeddingOutput(tokens=min(n, info.max_tokens))
                if dense:
                    result.dense = np.asarray(out["dense_vecs"][i], dtype=np.float32)
                if sparse:
                    # Keys are already token-id strings; np.float32 values are not JSON-serialisable.
                    result.sparse = {str(k): float(v) for k, v in out["lexical_weights"][i].items()}
                if colbert:
                    result.colbert = np.asarray(out["colbert_vecs"][i], dtype=np.float32)
                results.append(result)
        return results

    def count_tokens(self, texts: list[str]) -> list[int]:
        self.info()
        return hf.count_tokens(self._model.tokenizer, texts)

    def decode_tokens(self, ids: list[int]) -> str:
        self.info()
        return hf.decode_tokens(self._model.tokenizer, ids)

    def close(self) -> None:
        if self._model is not None:
            self._model.stop_self_pool()  # no-op on one device; frees worker processes otherwise
        super().close()
