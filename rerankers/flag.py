"""bge-reranker family through FlagEmbedding's `FlagReranker` (raw logits, sigmoid in `rerank()`).

Chosen by RERANKER_ENGINE=flag only: the cross-encoder engine loads the same folders and gives the
same logits for less work (see rerankers.factory). `compute_score()` runs its first batch twice (a
batch-size probe), so each call costs about two forward passes. What it does differently:
truncation keeps at most 3/4 of the tokens for the query, where the cross-encoder truncates the
longer of the two.
"""

from __future__ import annotations

from embedders import hf
from embedders.base import hf_max_tokens
from embedders.torch_engine import TorchEngine
from kernel.errors import ModelUnavailableError, engine_errors
from rerankers.base import Reranker, RerankerInfo


class FlagRerankerReranker(TorchEngine[RerankerInfo], Reranker):
    name = "flag"
    model_kind = "reranker"

    def load(self) -> None:
        path = self._begin_load("FlagEmbedding reranker")
        from FlagEmbedding import FlagReranker  # ~10 s: datasets, peft, pandas

        max_tokens = hf_max_tokens(path, cap=self.tier.n_ctx)
        try:
            model = FlagReranker(
                path,
                use_fp16=False,
                devices=self._device,
                batch_size=self._batch_size,
                max_length=max_tokens,
                normalize=False,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelUnavailableError(f"Cannot load {path} with FlagReranker: {exc}") from exc
        self._model = model
        self._info = RerankerInfo(engine=self.name, max_tokens=max_tokens, score_kind="logit", device=self._device)

    def score(self, query: str, docs: list[str]) -> list[float]:
        return self.score_pairs([(query, doc) for doc in docs])

    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[float]:
        self.info()
        if not pairs:
            return []
        scores: list[float] = []
        with engine_errors(self.name):
            for start in range(0, len(pairs), self._batch_size):
                chunk = pairs[start : start + self._batch_size]
                # batch_size > len(chunk): FlagEmbedding draws progress bars for full batches.
                out = self._model.compute_score(chunk, batch_size=len(chunk) + 1, normalize=False)
                # One pair can come back as a bare float depending on the FlagEmbedding version.
                scores.extend(float(x) for x in (out if isinstance(out, list) else [out]))
        return scores

    def count_tokens(self, query: str, docs: list[str]) -> int:
        return hf.count_pair_tokens(self._model.tokenizer, query, docs, self.info().max_tokens)

    def close(self) -> None:
        if self._model is not None:
            self._model.stop_self_pool()  # no-op on one device; frees worker processes otherwise
        super().close()
