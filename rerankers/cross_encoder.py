"""Cross-encoder reranking with sentence-transformers (`CrossEncoder`, one relevance logit per pair).
With `RERANKER_RUNTIME=onnx` the sequence classifier runs in onnxruntime (embedders.onnx_runtime)."""

from __future__ import annotations

import numpy as np

from embedders import hf
from embedders.base import hf_max_tokens, pad_rows, passes
from embedders.onnx_runtime import OnnxModule, onnx_or_torch
from embedders.torch_engine import TorchEngine
from kernel.errors import ModelUnavailableError, engine_errors
from rerankers.base import Reranker, RerankerInfo


class CrossEncoderReranker(TorchEngine[RerankerInfo], Reranker):
    name = "cross_encoder"
    model_kind = "reranker"
    runtimes = ("torch", "onnx", "auto")
    _onnx: OnnxModule | None = None

    def load(self) -> None:
        path = self._begin_load("cross-encoder")
        import torch
        from sentence_transformers import CrossEncoder

        max_tokens = hf_max_tokens(path, cap=self.tier.n_ctx)
        try:
            # Identity: we want raw logits; `rerank()` applies the sigmoid itself (CrossEncoder's
            # default activation for one label is a sigmoid, which would be applied twice).
            model = CrossEncoder(path, device=self._device, max_length=max_tokens, activation_fn=torch.nn.Identity())
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelUnavailableError(f"Cannot load {path} as a cross-encoder: {exc}") from exc
        labels = int(model.config.num_labels)
        if labels != 1:
            raise ModelUnavailableError(
                f"{path} has {labels} output labels; a reranker needs a one-logit cross-encoder"
            )
        self._model = model
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in model.tokenizer(["a"], ["b"])]
        self._onnx = onnx_or_torch(
            self.tier.runtime,
            self._device,
            path,
            lambda: OnnxModule(model.model, names, "logits", path, threads=self.tier.n_threads),
        )
        self._info = RerankerInfo(engine=self.name, max_tokens=max_tokens, score_kind="logit", device=self._device)

    def score(self, query: str, docs: list[str]) -> list[float]:
        return self.score_pairs([(query, doc) for doc in docs])

    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[float]:
        self.info()
        if not pairs:
            return []
        if self._onnx is not None:
            return self._score_onnx(self._onnx, pairs)
        with engine_errors(self.name):
            logits = self._model.predict(
                pairs,
                batch_size=self._batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
            )
        return [float(x) for x in np.asarray(logits, dtype=np.float32).reshape(-1)]

    def _score_onnx(self, onnx: OnnxModule, pairs: list[tuple[str, str]]) -> list[float]:
        """Pairs tokenised once, then scored longest first in passes of similar length (as the
        embedders run: at most BATCH_SIZE rows and, on a CPU, a bounded number of padded tokens)."""
        scores = np.empty(len(pairs), dtype=np.float32)
        tokenizer, max_tokens = self._model.tokenizer, self.info().max_tokens
        with engine_errors(self.name):
            encoded = tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation=True, max_length=max_tokens)
            pads = {name: int(tokenizer.pad_token_id or 0) if name == "input_ids" else 0 for name in onnx.inputs}
            lengths = [len(row) for row in encoded["input_ids"]]
            for rows in passes(lengths, self._batch_size, self._pass_tokens):
                feeds = {name: pad_rows([encoded[name][i] for i in rows], pad) for name, pad in pads.items()}
                scores[rows] = onnx.run(feeds).reshape(len(rows), -1)[:, 0]
        return [float(x) for x in scores]

    def count_tokens(self, query: str, docs: list[str]) -> int:
        return hf.count_pair_tokens(self._model.tokenizer, query, docs, self.info().max_tokens)
