"""An embedding engine with no weights, for testing the app in-process (see backends/fake.py).
Never chosen by settings. Words are tokens; a word's vector is a fixed pseudo-random direction
(from its hash), a text's dense vector the normalised sum of its words', so equal texts embed
equally and texts sharing words come out close."""

from __future__ import annotations

import hashlib

import numpy as np

from embedders.base import Embedder, EmbedderInfo, EmbeddingOutput
from kernel.config import TierSettings


def _word_vector(word: str, dimension: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dimension).astype(np.float32)


class FakeEmbedder(Embedder):
    name = "fake"

    def __init__(self, tier: TierSettings, model_path: str, *, dimension: int = 16, max_tokens: int = 64) -> None:
        super().__init__()
        self.tier = tier
        self.model_path = model_path
        self.dimension = tier.embedding_dimension or dimension
        self.max_tokens = max_tokens
        self.vocab: dict[str, int] = {}  # word → id, as words are first seen

    def load(self) -> None:
        self.vocab.clear()

    def info(self) -> EmbedderInfo:
        return EmbedderInfo("fake", self.dimension, self.max_tokens, frozenset({"dense", "sparse", "colbert"}), False)

    def _words(self, text: str) -> list[str]:
        return text.lower().split()[: self.max_tokens] or [""]

    def embed(
        self, texts: list[str], *, dense: bool = True, sparse: bool = False, colbert: bool = False
    ) -> list[EmbeddingOutput]:
        outputs = []
        for text in texts:
            words = self._words(text)
            rows = np.stack([_word_vector(w, self.dimension) for w in words])
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
            total = rows.sum(axis=0)
            out = EmbeddingOutput(len(words))
            if dense:
                out.dense = (total / max(float(np.linalg.norm(total)), 1e-12)).astype(np.float32)
            if sparse:
                ids = [str(self.vocab.setdefault(w, len(self.vocab))) for w in words]
                out.sparse = {i: round(ids.count(i) / len(ids), 6) for i in dict.fromkeys(ids)}
            if colbert:
                out.colbert = rows
            outputs.append(out)
        return outputs

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(text.split()) for text in texts]

    def decode_tokens(self, ids: list[int]) -> str:
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words.get(i, f"<{i}>") for i in ids)
