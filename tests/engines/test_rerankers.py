"""Rerankers on real loading code: tiny cross-encoders (sentence-transformers and FlagEmbedding),
and the embedding reranker over all-MiniLM-L6-v2 and a tiny BGE-M3."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from embedders.base import Embedder
from embedders.factory import create_embedder
from kernel.config import TierSettings
from kernel.errors import InvalidRequestError, ModelUnavailableError
from rerankers.base import Reranker, RerankResult, normalize_score, sigmoid
from rerankers.cross_encoder import CrossEncoderReranker
from rerankers.embedding import EmbeddingReranker
from rerankers.factory import choose_reranker, create_reranker
from rerankers.flag import FlagRerankerReranker

TIER = TierSettings(name="reranker")
QUERY = "what do cats eat"
DOCS = [
    "cats eat fish and mice",
    "paris is the capital of france",
    "the weather is cold today",
    "dogs play in the garden",
    "machine learning with python",
]


@pytest.fixture(scope="session")
def cross_encoder(tiny_bert_ce: Path) -> Reranker:
    reranker = create_reranker(TIER, str(tiny_bert_ce))
    assert isinstance(reranker, CrossEncoderReranker)
    reranker.load()
    return reranker


@pytest.fixture(scope="session")
def flag(tiny_xlmr_ce: Path) -> Reranker:
    reranker = create_reranker(TierSettings(name="reranker", engine="flag"), str(tiny_xlmr_ce))
    assert isinstance(reranker, FlagRerankerReranker)
    reranker.load()
    return reranker


@pytest.fixture(scope="session")
def minilm(minilm_path: str) -> Embedder:
    embedder = create_embedder(TierSettings(name="embedding"), minilm_path)
    embedder.load()
    return embedder


@pytest.fixture(scope="session")
def tiny_bge_m3(tiny_bge_m3_path: Path) -> Embedder:
    embedder = create_embedder(TierSettings(name="embedding"), str(tiny_bge_m3_path))
    embedder.load()
    return embedder


def _check_ordering(results: list[RerankResult], raw: list[float]) -> None:
    assert sorted(r.index for r in results) == list(range(len(raw)))
    for r in results:
        assert math.isclose(r.raw_score, raw[r.index], rel_tol=1e-3, abs_tol=1e-4)
    assert all(a.raw_score >= b.raw_score for a, b in itertools.pairwise(results))
    assert all(a.score >= b.score for a, b in itertools.pairwise(results))


# -- base ---------------------------------------------------------------------------------------------


def test_sigmoid_and_similarity_normalisation() -> None:
    assert sigmoid(0.0) == 0.5
    assert sigmoid(1000.0) == 1.0 and sigmoid(-1000.0) == 0.0  # no overflow
    assert normalize_score(2.0, "logit") == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert normalize_score(0.7, "similarity") == 0.7  # cosine is not squashed by a sigmoid
    assert normalize_score(-0.2, "similarity") == 0.0
    assert normalize_score(1.3, "similarity") == 1.0


def test_factory_choices(tiny_bert_ce: Path, tiny_xlmr_ce: Path) -> None:
    assert choose_reranker(TIER, str(tiny_bert_ce)) == "cross_encoder"
    # bge-reranker's layout (an XLM-R classifier, no sentence-transformers metadata): the cross-encoder
    # gives FlagReranker's logits for less work (test_cross_encoder_returns_raw_logits_like_flag).
    assert choose_reranker(TIER, str(tiny_xlmr_ce)) == "cross_encoder"
    assert choose_reranker(TIER, "tier:embedding") == "embedding"
    assert choose_reranker(TIER, "BAAI/bge-reranker-v2-m3") == "cross_encoder"
    forced = TierSettings(name="reranker", engine="cross_encoder")
    assert choose_reranker(forced, str(tiny_xlmr_ce)) == "cross_encoder"
    assert choose_reranker(TierSettings(name="reranker", engine="flag"), str(tiny_bert_ce)) == "flag"
    with pytest.raises(ModelUnavailableError, match="RERANKER_ENGINE"):
        choose_reranker(TierSettings(name="reranker", engine="colbert"), str(tiny_bert_ce))
    with pytest.raises(ModelUnavailableError, match="embedding tier"):
        create_reranker(TIER, "tier:embedding")


def test_missing_folder_fails_fast() -> None:
    for engine in ("flag", "cross_encoder"):
        with pytest.raises(ModelUnavailableError, match="does not exist"):
            create_reranker(TierSettings(name="reranker", engine=engine), "/nonexistent/rr").load()


# -- cross-encoder and FlagReranker -------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["cross_encoder", "flag"])
def test_rerank_order_normalisation_and_top_n(engine: str, request: pytest.FixtureRequest) -> None:
    reranker: Reranker = request.getfixturevalue(engine)
    assert reranker.info().score_kind == "logit"
    raw = reranker.score(QUERY, DOCS)
    assert len(raw) == len(DOCS) and len(set(raw)) > 1  # initializer_range=0.5: scores differ

    results = reranker.rerank(QUERY, DOCS)
    _check_ordering(results, raw)
    for r in results:
        assert 0.0 < r.score < 1.0
        assert r.score == pytest.approx(sigmoid(r.raw_score))

    plain = reranker.rerank(QUERY, DOCS, normalize=False)
    assert all(r.score == r.raw_score for r in plain)
    assert [r.index for r in plain] == [r.index for r in results]

    top = reranker.rerank(QUERY, DOCS, top_n=2)
    assert [r.index for r in top] == [r.index for r in results[:2]]
    assert len(reranker.rerank(QUERY, DOCS, top_n=50)) == len(DOCS)
    assert reranker.rerank(QUERY, []) == []
    with pytest.raises(InvalidRequestError) as info:
        reranker.rerank(QUERY, DOCS, top_n=0)
    assert info.value.param == "top_n"
    assert len(reranker.rerank(QUERY, DOCS[:1])) == 1  # a single pair still works

    assert reranker.count_tokens(QUERY, DOCS) > len(DOCS) * 4


@pytest.mark.parametrize("engine", ["cross_encoder", "flag"])
def test_score_pairs_mixes_queries_like_separate_calls(engine: str, request: pytest.FixtureRequest) -> None:
    reranker: Reranker = request.getfixturevalue(engine)
    other = "paris france"
    pairs = [(QUERY, d) for d in DOCS[:3]] + [(other, d) for d in DOCS] + [(QUERY, DOCS[4])]
    mixed = reranker.score_pairs(pairs)
    alone = reranker.score(QUERY, DOCS[:3]) + reranker.score(other, DOCS) + reranker.score(QUERY, DOCS[4:])
    assert mixed == pytest.approx(alone, rel=1e-3, abs=1e-4)
    ranked = reranker.rank(mixed[3:8], top_n=3)
    assert [r.index for r in ranked] == [r.index for r in reranker.rerank(other, DOCS, top_n=3)]


def test_cross_encoder_returns_raw_logits_like_flag(tiny_xlmr_ce: Path, flag: Reranker) -> None:
    """CrossEncoder applies a sigmoid by default; ours must hand back the same logits FlagReranker does."""
    ce = create_reranker(TierSettings(name="reranker", engine="cross_encoder"), str(tiny_xlmr_ce))
    ce.load()
    for a, b in zip(ce.score(QUERY, DOCS), flag.score(QUERY, DOCS), strict=True):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_cross_encoder_gives_sentence_transformers_own_scores(tiny_bert_ce: Path, runtime: str) -> None:
    """Our passes (request-side tokens, longest first, padded by us) score what `CrossEncoder.predict`
    does, truncation of an over-long pair included."""
    import torch
    from sentence_transformers import CrossEncoder

    reranker = create_reranker(TierSettings(name="reranker", runtime=runtime, batch_size=3), str(tiny_bert_ce))
    assert isinstance(reranker, CrossEncoderReranker)
    reranker.load()
    assert reranker.pretokenizes
    pairs = [(QUERY, d) for d in DOCS] + [("cats " * 100, "fish " * 300), ("q", "")]
    limit = reranker.info().max_tokens
    reference = CrossEncoder(str(tiny_bert_ce), max_length=limit, activation_fn=torch.nn.Identity())
    expected = reference.predict(pairs, batch_size=2, convert_to_numpy=True)
    assert reranker.score_pairs(pairs) == pytest.approx(expected.tolist(), rel=1e-3, abs=1e-4)
    tokens = reranker.tokenize_pairs(QUERY, DOCS)
    own = reference.tokenizer([QUERY] * len(DOCS), DOCS)
    assert [t.ids for t in tokens] == own["input_ids"] and [t.type_ids for t in tokens] == own["token_type_ids"]
    assert reranker.score_tokens(tokens) == pytest.approx(reranker.score(QUERY, DOCS), abs=1e-6)
    assert reranker.count_tokens(QUERY, DOCS) == sum(len(t.ids) for t in tokens)


def test_long_documents_are_truncated_not_fatal(cross_encoder: Reranker, flag: Reranker) -> None:
    long_doc = "cats eat fish " * 300  # far past the tiny models' 128 positions
    for reranker in (cross_encoder, flag):
        assert len(reranker.score(QUERY, [long_doc, "dogs"])) == 2


# -- embedding reranker -------------------------------------------------------------------------------


def test_embedding_reranker_with_minilm_ranks_the_relevant_doc_first(minilm: Embedder) -> None:
    reranker = create_reranker(TIER, "tier:embedding", embedder_provider=lambda: minilm)
    assert isinstance(reranker, EmbeddingReranker)
    reranker.load()
    assert reranker.info().score_kind == "similarity"
    docs = ["Berlin is the capital of Germany.", "Paris is the capital of France.", "Bananas are yellow."]
    results = reranker.rerank("What is the capital of France?", docs)
    assert results[0].index == 1
    _check_ordering(results, reranker.score("What is the capital of France?", docs))
    assert all(0.0 <= r.score <= 1.0 for r in results)
    assert all(r.score == pytest.approx(min(1.0, max(0.0, r.raw_score))) for r in results)
    assert reranker.info().extras["weights"] == {"dense": 1.0, "sparse": 0.0, "colbert": 0.0}
    assert reranker.count_tokens("q", ["a b", "c"]) > 0
    # The default score_pairs groups runs of one query: same scores as per-query calls.
    pairs = [("capital of France", d) for d in docs] + [("yellow fruit", d) for d in docs]
    expected = reranker.score("capital of France", docs) + reranker.score("yellow fruit", docs)
    assert reranker.score_pairs(pairs) == pytest.approx(expected, abs=1e-5)


def test_embedding_reranker_with_bge_m3_uses_all_three_scores(tiny_bge_m3: Embedder) -> None:
    tier = TierSettings(name="reranker", hybrid_weights=(0.4, 0.2, 0.4))
    reranker = create_reranker(tier, "tier:embedding", embedder_provider=lambda: tiny_bge_m3)
    reranker.load()
    assert reranker.info().extras["weights"] == {"dense": 0.4, "sparse": 0.2, "colbert": 0.4}
    query = "the cat sat on the mat"
    docs = ["paris is a big city", "the cat sat on the mat", "music and books"]
    results = reranker.rerank(query, docs)
    assert results[0].index == 1  # the identical text: dense and ColBERT similarity 1, most shared tokens
    _check_ordering(results, reranker.score(query, docs))
