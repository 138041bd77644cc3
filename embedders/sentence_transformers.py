"""Dense embeddings with sentence-transformers (MiniLM, BGE, E5, GTE... any ST folder).

Texts are tokenised on the request side (`PreTokenizing`, a private copy of the fast tokenizer)
and the model thread runs only the forward pass: the model's own modules (Transformer, Pooling,
Normalize) on tensors we pad, under `torch.inference_mode`, which is what `encode()` does per
batch minus its tokenisation, sorting and progress bookkeeping. With `EMBEDDING_RUNTIME=onnx` the
Transformer module runs in onnxruntime (embedders.onnx_runtime) and the modules after it in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedders import hf
from embedders.base import (
    Embedder,
    EmbedderInfo,
    EmbeddingOutput,
    PreTokenizing,
    l2_normalize,
    padded_batches,
    request_tokenizer,
)
from embedders.onnx_runtime import OnnxModule, onnx_or_torch
from embedders.torch_engine import TorchEngine
from kernel.errors import ModelUnavailableError, engine_errors

if TYPE_CHECKING:
    from kernel.config import TierSettings


class SentenceTransformerEmbedder(TorchEngine[EmbedderInfo], Embedder, PreTokenizing):
    name = "sentence_transformers"
    model_kind = "embedding"
    runtimes = ("torch", "onnx", "auto")

    def __init__(self, tier: TierSettings, model_path: str) -> None:
        super().__init__(tier, model_path)
        # OpenAI clients assume unit vectors (cosine == dot); opt out for dot-product models.
        self._normalize = tier.normalize
        self._request_tokenizer: Any = None
        self._inputs: frozenset[str] = frozenset()
        self._pad_id = 0
        self._onnx: OnnxModule | None = None  # the Transformer module, with RUNTIME=onnx

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
        tokenizer = model.tokenizer
        # Tensors the model's own tokenisation would give it (BERT: token_type_ids too).
        probe = tokenizer(["a"], truncation=True, max_length=max_tokens)
        self._inputs = frozenset(probe.keys())
        self._pad_id = int(tokenizer.pad_token_id or 0)
        if getattr(tokenizer, "is_fast", False) and "input_ids" in self._inputs:
            self._request_tokenizer = request_tokenizer(tokenizer, max_tokens)
        self._onnx = onnx_or_torch(self.tier.runtime, self._device, path, lambda: self._export_transformer(model, path))
        # The model's Normalize module already gives unit vectors: don't normalise twice.
        self._normalize = self._normalize and not any(type(m).__name__ == "Normalize" for m in model)
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
        return self.embed_tokens(self.tokenize(texts), dense=dense, sparse=sparse, colbert=colbert)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        info = self.info()
        if not texts:
            return []
        if self._request_tokenizer is None:  # a slow (Python) tokenizer: not shareable, use the model's
            with self.lock:
                ids: list[list[int]] = self._model.tokenizer(texts, truncation=True, max_length=info.max_tokens)[
                    "input_ids"
                ]
            return ids
        return [e.ids for e in self._request_tokenizer.encode_batch(texts)]

    def embed_tokens(
        self, ids: list[list[int]], *, dense: bool = True, sparse: bool = False, colbert: bool = False
    ) -> list[EmbeddingOutput]:
        import torch

        self.check_outputs(dense=dense, sparse=sparse, colbert=colbert)
        self.info()
        results: list[EmbeddingOutput | None] = [None] * len(ids)
        with engine_errors(self.name):
            for chunk, input_ids, mask in padded_batches(ids, self._batch_size, self._pad_id, self._pass_tokens):
                features = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
                if "token_type_ids" in self._inputs:
                    features["token_type_ids"] = torch.zeros_like(features["input_ids"])
                features = {k: v.to(self._device) for k, v in features.items()}
                with torch.inference_mode():
                    if self._onnx is not None:
                        feeds = {k: v.numpy() for k, v in features.items()}
                        features["token_embeddings"] = torch.from_numpy(self._onnx.run(feeds))
                        for module in list(self._model)[1:]:  # pooling, dense, normalize: the model's own
                            features = module(features)
                    else:
                        features = self._model(features)
                    vectors = features["sentence_embedding"].float().cpu().numpy()
                if self._normalize:
                    vectors = l2_normalize(vectors)
                for row, i in enumerate(chunk):
                    results[i] = EmbeddingOutput(tokens=len(ids[i]), dense=vectors[row])
        return [r for r in results if r is not None]

    def _export_transformer(self, model: Any, path: str) -> OnnxModule:
        auto_model = getattr(model[0], "auto_model", None)
        if auto_model is None:
            raise ModelUnavailableError(f"{path} does not start with a Transformer module to export")
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in self._inputs]
        return OnnxModule(auto_model, names, "last_hidden_state", path, threads=self.tier.n_threads)

    def count_tokens(self, texts: list[str]) -> list[int]:
        self.info()
        return hf.count_tokens(self._model.tokenizer, texts)

    def decode_tokens(self, ids: list[int]) -> str:
        self.info()
        return hf.decode_tokens(self._model.tokenizer, ids)
