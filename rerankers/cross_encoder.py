"""Cross-encoder reranking: a sentence-transformers `CrossEncoder` folder (one relevance logit per pair).

Pairs are tokenised on the request side (`PairTokenizing`, a private copy of the fast tokenizer),
and the model thread only runs forward passes: longest pairs first, rows of similar length together,
through the model's sequence classifier (its last layer for the first token only where the head
reads nothing else: rerankers.first_token), in torch (what `CrossEncoder.predict` does per batch)
or, with `RERANKER_RUNTIME=onnx`, in onnxruntime (embedders.onnx_runtime).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from embedders.base import hf_max_tokens, pad_batch, pad_rows, passes, request_tokenizer
from embedders.onnx_runtime import OnnxModule, onnx_or_torch
from embedders.torch_engine import TorchEngine
from kernel.errors import ModelUnavailableError, engine_errors
from rerankers.base import PairTokenizing, PairTokens, Reranker, RerankerInfo, encode_pairs


class CrossEncoderReranker(TorchEngine[RerankerInfo], Reranker, PairTokenizing):
    name = "cross_encoder"
    model_kind = "reranker"
    runtimes = ("torch", "onnx", "auto")
    _onnx: OnnxModule | None = None
    _request_tokenizer: Any = None
    _inputs: tuple[str, ...] = ()
    _pad_id = 0
    _classifier: Any = None  # the sequence classifier, or its first-token-only form (rerankers.first_token)

    def load(self) -> None:
        path = self._begin_load("cross-encoder")
        from sentence_transformers import CrossEncoder

        from rerankers.first_token import first_token_classifier  # torch: imported when a tier loads

        max_tokens = hf_max_tokens(path, cap=self.tier.n_ctx)
        try:
            model = CrossEncoder(path, device=self._device, max_length=max_tokens)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelUnavailableError(f"Cannot load {path} as a cross-encoder: {exc}") from exc
        labels = int(model.config.num_labels)
        if labels != 1:
            raise ModelUnavailableError(
                f"{path} has {labels} output labels; a reranker needs a one-logit cross-encoder"
            )
        tokenizer = model.tokenizer
        # Two padded pairs: the tensors the model's own tokenisation gives it (BERT: token_type_ids
        # too), and a check that the first-token-only classifier gives its logits.
        probe = tokenizer(["a query", "q"], ["a document", "a longer document"], padding=True, return_tensors="pt")
        self._inputs = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in probe)
        self._pad_id = int(tokenizer.pad_token_id or 0)
        if getattr(tokenizer, "is_fast", False):
            self._request_tokenizer = request_tokenizer(tokenizer, max_tokens)
        self._model = model
        first_token = first_token_classifier(model.model, {k: v.to(self._device) for k, v in probe.items()})
        self._classifier = first_token or model.model
        graph, threads = ("first-token" if first_token is not None else ""), self.tier.n_threads
        self._onnx = onnx_or_torch(
            self.tier.runtime,
            self._device,
            path,
            lambda: OnnxModule(self._classifier, self._inputs, "logits", path, threads=threads, graph=graph),
        )
        self._info = RerankerInfo(engine=self.name, max_tokens=max_tokens, score_kind="logit", device=self._device)

    @property
    def pretokenizes(self) -> bool:
        return self._request_tokenizer is not None

    def score(self, query: str, docs: list[str]) -> list[float]:
        return self.score_pairs([(query, doc) for doc in docs])

    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[float]:
        return self.score_tokens(self._tokenize(pairs))

    def tokenize_pairs(self, query: str, docs: list[str]) -> list[PairTokens]:
        return self._tokenize([(query, doc) for doc in docs])

    def _tokenize(self, pairs: list[tuple[str, str]]) -> list[PairTokens]:
        max_tokens = self.info().max_tokens
        if not pairs:
            return []
        if self._request_tokenizer is not None:
            return encode_pairs(self._request_tokenizer, pairs)
        # A slow (Python) tokenizer, the model's own (`pretokenizes` is False: scoring tokenises here).
        encoded = self._model.tokenizer(
            [q for q, _ in pairs], [d for _, d in pairs], truncation=True, max_length=max_tokens
        )
        ids: list[list[int]] = encoded["input_ids"]
        types: list[list[int]] = encoded.get("token_type_ids") or [[0] * len(row) for row in ids]
        return [PairTokens(i, t) for i, t in zip(ids, types, strict=True)]

    def score_tokens(self, pairs: list[PairTokens]) -> list[float]:
        """Longest first in passes of similar length: at most BATCH_SIZE rows and, on a CPU, a
        bounded number of padded tokens (as the embedders run)."""
        self.info()
        scores = np.empty(len(pairs), dtype=np.float32)
        with engine_errors(self.name):
            for rows in passes([len(p.ids) for p in pairs], self._batch_size, self._pass_tokens):
                input_ids, mask = pad_batch([pairs[i].ids for i in rows], self._pad_id)
                feeds = {"input_ids": input_ids, "attention_mask": mask}
                if "token_type_ids" in self._inputs:
                    feeds["token_type_ids"] = pad_rows([pairs[i].type_ids for i in rows], 0)
                scores[rows] = self._logits(feeds)
        return [float(x) for x in scores]

    def _logits(self, feeds: dict[str, npt.NDArray[np.int64]]) -> npt.NDArray[np.float32]:
        """One pass's raw logits (no activation: `rank()` applies the sigmoid when asked)."""
        if self._onnx is not None:
            return self._onnx.run(feeds)[:, 0]
        import torch

        with torch.inference_mode():
            tensors = {name: torch.from_numpy(feeds[name]).to(self._device) for name in self._inputs}
            logits = self._classifier(**tensors, return_dict=True).logits
        out: npt.NDArray[np.float32] = logits[:, 0].float().cpu().numpy()
        return out

    def count_tokens(self, query: str, docs: list[str]) -> int:
        return sum(len(p.ids) for p in self.tokenize_pairs(query, docs))
