"""RAG collections over real HTTP: the real MiniLM embedding tier, the real Gemma 3 270M (llama.cpp)
for the grounded answers, embedded Qdrant in a temporary data folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.live import LiveServer, error_of, live_server

MASCOT = "The llmservice project's mascot is a purple otter named Quill, chosen by the team in 2024."
DOCS: list[dict[str, Any]] = [
    {"id": "mascot", "text": MASCOT, "metadata": {"topic": "project", "year": 2024}},
    {
        "id": "bread",
        "text": "To bake bread, mix flour, water, yeast and salt, knead the dough, let it rise for an hour"
        " and bake it at 230 degrees for thirty minutes.",
        "metadata": {"topic": "cooking"},
    },
    {
        "id": "notes/tax.md",  # ids may look like paths: they never become one
        "text": "Income tax returns are due in April; keep the receipts for every deduction you claim.",
        "metadata": {"topic": "money", "draft": True},
    },
]
QUESTION = "What is the name of the llmservice mascot?"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rag") / "collections"


@pytest.fixture(scope="module")
def server(gemma_gguf: str, minilm_path: str, data_dir: Path) -> Iterator[LiveServer]:
    env = {
        "LIGHT_MODEL_PATH": gemma_gguf,
        "LIGHT_N_CTX": "2048",
        "LIGHT_MAX_TOKENS": "24",
        "LIGHT_TEMPERATURE": "0",
        # Greedy Gemma 270M answers from the passages or echoes the instructions depending on how the
        # prompt is split into batches; without SWA_FULL its last 4 tokens are a batch of their own
        # (a context checkpoint before them), which tips it to the echo.
        "LIGHT_SWA_FULL": "true",
        "EMBEDDING_MODEL_PATH": minilm_path,
        "RERANKER_MODEL_PATH": "tier:embedding",
        "COLLECTIONS_DIR": str(data_dir),
        "MAX_BATCH_INPUTS": "40",
        "MAX_DOCUMENT_CHARS": "20000",
    }
    with live_server(env, wait_for=("light", "embedding", "reranker")) as live:
        yield live


@pytest.fixture(scope="module")
def kb(server: LiveServer) -> str:
    with server.client() as http:
        res = http.post("/v1/collections", json={"name": "kb", "metadata": {"owner": "tests"}})
        assert res.status_code == 200, res.text
        res = http.post("/v1/collections/kb/documents", json={"documents": DOCS})
        assert res.status_code == 200, res.text
    return "kb"


def test_collection_crud(server: LiveServer, kb: str) -> None:
    with server.client() as http:
        got = http.get(f"/v1/collections/{kb}").json()
        assert got["object"] == "collection" and got["id"] == kb
        assert (got["dimension"], got["hybrid"], got["chunks"]) == (384, False, 3)  # MiniLM: dense only
        assert (got["chunk_size"], got["chunk_overlap"], got["metadata"]) == (800, 100, {"owner": "tests"})
        assert kb in [c["id"] for c in http.get("/v1/collections").json()["data"]]

        error = error_of(http.post("/v1/collections", json={"name": kb}), 409)
        assert error["code"] == "collection_exists"

        assert http.post("/v1/collections", json={"name": "scratch", "chunk_size": 200}).status_code == 200
        deleted = http.delete("/v1/collections/scratch")
        assert deleted.json() == {"id": "scratch", "object": "collection.deleted", "deleted": True, "chunks": None}
        for res in (
            http.get("/v1/collections/scratch"),
            http.delete("/v1/collections/scratch"),
            http.post("/v1/collections/scratch/query", json={"query": "x"}),
            http.post("/v1/collections/scratch/documents", json={"documents": [{"text": "x"}]}),
        ):
            assert error_of(res, 404)["code"] == "collection_not_found"


def test_documents_list_page_replace_and_delete(server: LiveServer, kb: str) -> None:
    with server.client() as http:
        http.post("/v1/collections", json={"name": "docs", "chunk_size": 200, "chunk_overlap": 40})
        long_text = " ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(60))
        added = http.post(
            "/v1/collections/docs/documents", json={"documents": [*DOCS, {"id": "long", "text": long_text}]}
        )
        assert added.status_code == 200, added.text
        by_id = {d["id"]: d for d in added.json()["data"]}
        assert by_id["long"]["chunks"] > 5 and by_id["long"]["characters"] == len(long_text)
        assert added.json()["usage"]["prompt_tokens"] > 0

        first = http.get("/v1/collections/docs/documents", params={"limit": 2}).json()
        assert len(first["data"]) == 2 and first["has_more"] is True
        rest = http.get("/v1/collections/docs/documents", params={"limit": 2, "after": first["last_id"]}).json()
        assert rest["has_more"] is False
        assert sorted(d["id"] for d in first["data"] + rest["data"]) == sorted(by_id)
        assert {d["id"]: d["metadata"] for d in first["data"] + rest["data"]}["notes/tax.md"] == DOCS[2]["metadata"]

        # Adding an id again replaces the document, stale chunks included.
        chunks = http.get("/v1/collections/docs").json()["chunks"]
        again = http.post("/v1/collections/docs/documents", json={"documents": [{"id": "long", "text": "Short now."}]})
        assert again.json()["data"][0]["chunks"] == 1
        assert http.get("/v1/collections/docs").json()["chunks"] == chunks - by_id["long"]["chunks"] + 1

        gone = http.delete("/v1/collections/docs/documents/notes/tax.md")
        assert gone.json() == {
            "id": "notes/tax.md",
            "object": "collection.document.deleted",
            "deleted": True,
            "chunks": 1,
        }
        assert error_of(http.delete("/v1/collections/docs/documents/notes/tax.md"), 404)["code"] == "document_not_found"
        hits = http.post("/v1/collections/docs/query", json={"query": "income tax receipts", "top_k": 10}).json()
        assert "notes/tax.md" not in {h["document_id"] for h in hits["data"]}
        http.delete("/v1/collections/docs")


def test_query_ranks_by_meaning_reranks_and_filters(server: LiveServer, kb: str) -> None:
    with server.client() as http:
        res = http.post(f"/v1/collections/{kb}/query", json={"query": "How long should the dough rise?", "top_k": 2})
        body = res.json()
        assert res.status_code == 200, res.text
        assert body["data"][0]["document_id"] == "bread"
        # The reranker tier scores with the embedding model that retrieved: the same cosine on the
        # same vectors cannot change the order, so it is skipped, and the answer says so.
        assert body["reranked"] is False and "cannot change their order" in body["rerank_skipped"]
        asked = http.post(f"/v1/collections/{kb}/query", json={"query": "rise dough", "top_k": 2, "rerank": True})
        assert asked.json()["reranked"] is False and asked.json()["rerank_skipped"]
        assert [h["score"] for h in asked.json()["data"]] == [h["search_score"] for h in asked.json()["data"]]
        assert body["documents_retrieved"] == 2 and body["retrieval_time_ms"] > 0
        assert set(body["timings"]) == {"embed_ms", "search_ms", "rerank_ms"}
        top = body["data"][0]
        assert top["text"].startswith("To bake bread") and top["metadata"] == {"topic": "cooking"}

        plain = http.post(f"/v1/collections/{kb}/query", json={"query": "dough", "top_k": 3, "rerank": False}).json()
        assert plain["reranked"] is False and plain["timings"]["rerank_ms"] < 1
        assert [h["score"] for h in plain["data"]] == sorted((h["score"] for h in plain["data"]), reverse=True)

        only = {"query": "dough", "top_k": 3, "filter": {"topic": "money", "draft": True}}
        assert [h["document_id"] for h in http.post(f"/v1/collections/{kb}/query", json=only).json()["data"]] == [
            "notes/tax.md"
        ]
        year = {"query": "dough", "filter": {"year": 2024}}
        assert [h["document_id"] for h in http.post(f"/v1/collections/{kb}/query", json=year).json()["data"]] == [
            "mascot"
        ]


def test_rag_chat_answers_from_the_collection(server: LiveServer, kb: str) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1/collections/{kb}", api_key="none")
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    answer = client.chat.completions.create(model="light", messages=messages, extra_body={"rag": {"top_k": 2}})
    extra = answer.model_extra or {}
    assert "Quill" in (answer.choices[0].message.content or "")
    assert extra["sources"][0]["document_id"] == "mascot" and extra["sources"][0]["citation"] == 1
    assert extra["reranked"] is False and extra["rerank_skipped"]  # the default reranker: same model
    assert extra["documents_retrieved"] == 2 and extra["retrieval_time_ms"] > 0
    assert answer.object == "chat.completion" and answer.usage is not None and answer.usage.prompt_tokens > 50

    # Without the collection the model cannot know: the answer above came from retrieval.
    plain = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    alone = plain.chat.completions.create(model="light", messages=messages)
    assert "Quill" not in (alone.choices[0].message.content or "")

    # top_k 2, as above: Gemma 270M repeats the instructions rather than answer from three passages.
    stream = client.chat.completions.create(
        model="light", messages=messages, stream=True, extra_body={"rag": {"top_k": 2}}
    )
    chunks = list(stream)
    opening = chunks[0].model_extra or {}
    assert opening["sources"][0]["document_id"] == "mascot" and opening["documents_retrieved"] >= 1
    assert "Quill" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_rag_chat_refusals(server: LiveServer, kb: str) -> None:
    with server.client() as http:
        url = f"/v1/collections/{kb}/chat/completions"
        only_system = {"model": "light", "messages": [{"role": "system", "content": "Be brief."}]}
        assert error_of(http.post(url, json=only_system), 400)["param"] == "messages"
        ask = {"model": "light", "messages": [{"role": "user", "content": "hi"}]}
        assert error_of(http.post(url, json={**ask, "rag": {"top_k": 0}}), 400)["param"] == "rag.top_k"
        assert error_of(http.post(url, json={**ask, "model": "nope"}), 404)["code"] == "model_not_found"
        missing = http.post("/v1/collections/absent/chat/completions", json=ask)
        assert error_of(missing, 404)["code"] == "collection_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "../evil"}, "name"),
        ({"name": "Kb"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": ""}, "name"),
        ({"name": "ok", "hybrid": True}, "hybrid"),  # MiniLM has no sparse vectors
        ({"name": "ok", "chunk_size": 200, "chunk_overlap": 150}, "chunk_overlap"),
        ({"name": "ok", "chunk_size": 50}, "chunk_size"),
        ({"name": "ok", "metadata": {"a.b": 1}}, "metadata"),
        ({"name": "ok", "metadata": {"nested": {"a": 1}}}, "metadata[...]"),
        ({"name": "ok", "model": "light"}, "model"),  # a generation tier cannot embed
    ],
)
def test_bad_collections_are_refused(server: LiveServer, body: dict[str, Any], param: str) -> None:
    with server.client() as http:
        error = error_of(http.post("/v1/collections", json=body), 400)
        # msgspec names a bad dict key's dict in the message, not in `param`.
        assert str(error["param"]).startswith(param) or f"`$.{param}`" in str(error["message"])
        assert http.get("/v1/collections/ok").status_code == 404


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"documents": []}, "documents"),
        ({"documents": [{"text": ""}]}, "documents[0].text"),
        ({"documents": [{"text": "   "}]}, "documents[0].text"),
        ({"documents": [{"text": "x" * 20001}]}, "documents[0].text"),  # MAX_DOCUMENT_CHARS
        ({"documents": [{"text": "word " * 3900}]}, "documents"),  # 20 chunks of 800 is fine; see below
        ({"documents": [{"text": "a", "id": "same"}, {"text": "b", "id": "same"}]}, "documents"),
        ({"documents": [{"text": "a"}] * 41}, "documents"),  # MAX_BATCH_INPUTS
        ({"documents": [{"text": "a", "metadata": {f"k{i}": i for i in range(33)}}]}, "documents[0].metadata"),
        ({"documents": [{"text": "a", "id": "x" * 257}]}, "documents[0].id"),
    ],
)
def test_bad_documents_are_refused(server: LiveServer, kb: str, body: dict[str, Any], param: str) -> None:
    with server.client() as http:
        if body["documents"] and body["documents"][0]["text"].startswith("word"):
            # 19,500 characters in chunks of 800 fit; the same in chunks of 100 are > MAX_BATCH_INPUTS chunks.
            http.post("/v1/collections", json={"name": "small", "chunk_size": 100, "chunk_overlap": 0})
            res = http.post("/v1/collections/small/documents", json=body)
            http.delete("/v1/collections/small")
        else:
            res = http.post(f"/v1/collections/{kb}/documents", json=body)
        assert error_of(res, 400)["param"] == param
        assert http.get(f"/v1/collections/{kb}").json()["chunks"] == 3


@pytest.mark.parametrize("top_k", [0, 101, "5", None])
def test_bad_queries_are_refused(server: LiveServer, kb: str, top_k: object) -> None:
    with server.client() as http:
        res = http.post(f"/v1/collections/{kb}/query", json={"query": "x", "top_k": top_k})
        assert error_of(res, 400)["param"] == "top_k"
        for body in ({"query": ""}, {"query": "x", "filter": {"a.b": 1}}, {}):
            assert error_of(http.post(f"/v1/collections/{kb}/query", json=body), 400)


def test_hostile_names_stay_inside_the_data_folder(server: LiveServer, kb: str, data_dir: Path) -> None:
    outside = sorted(p.name for p in data_dir.parent.parent.iterdir())
    names = ["..", "%2e%2e", "..%2f..%2fetc", "a%00b", "x" * 5000, "ok.json", "~", "COM1", "a b", "é"]
    with server.client() as http:
        for name in names:
            for method, path in (
                ("GET", f"/v1/collections/{name}"),
                ("DELETE", f"/v1/collections/{name}"),
                ("POST", f"/v1/collections/{name}/query"),
                ("POST", f"/v1/collections/{name}/documents"),
                ("DELETE", f"/v1/collections/{name}/documents/..%2F..%2Fx"),
            ):
                body = {"query": "x", "documents": [{"text": "x"}]} if method == "POST" else None
                res = http.request(method, path, json=body)
                assert res.status_code in (400, 404), (method, path, res.status_code, res.text)
                assert set(res.json()) == {"error"}
        # Nothing was created beside the data folder, and inside it only Qdrant's own files.
        assert sorted(p.name for p in data_dir.parent.parent.iterdir()) == outside
        assert {p.name for p in (data_dir / "collection").iterdir()} <= {kb, "docs"}
        assert http.get("/health").status_code == 200


def test_admin_keys_guard_mutations(minilm_path: str, tmp_path: Path) -> None:
    env = {"EMBEDDING_MODEL_PATH": minilm_path, "COLLECTIONS_DIR": str(tmp_path), "API_KEYS": "sk-user",
           "ADMIN_API_KEYS": "sk-admin"}  # fmt: skip
    with live_server(env, wait_for=("embedding",)) as live, live.client() as http:
        user, admin = {"Authorization": "Bearer sk-user"}, {"Authorization": "Bearer sk-admin"}
        create = {"name": "private"}
        assert error_of(http.post("/v1/collections", json=create, headers=user), 403)["code"] == "admin_key_required"
        assert http.post("/v1/collections", json=create, headers=admin).status_code == 200
        docs = {"documents": [{"text": "hello world"}]}
        assert error_of(http.post("/v1/collections/private/documents", json=docs, headers=user), 403)
        assert http.post("/v1/collections/private/documents", json=docs, headers=admin).status_code == 200
        assert http.post("/v1/collections/private/query", json={"query": "hi"}, headers=user).status_code == 200
        assert http.get("/v1/collections", headers=user).status_code == 200
        assert error_of(http.delete("/v1/collections/private", headers=user), 403)
        assert error_of(http.get("/v1/collections"), 401)
        # A page in the user's browser may not write, even with no keys configured (admin routes).
        assert (
            http.delete("/v1/collections/private", headers={**admin, "Origin": "http://localhost:3000"}).status_code
            == 403
        )


def test_collections_survive_a_restart(minilm_path: str, tmp_path: Path) -> None:
    env = {"EMBEDDING_MODEL_PATH": minilm_path, "COLLECTIONS_DIR": str(tmp_path / "data")}
    with live_server(env, wait_for=("embedding",)) as live, live.client() as http:
        assert http.post("/v1/collections", json={"name": "kept"}).status_code == 200
        assert http.post("/v1/collections/kept/documents", json={"documents": DOCS}).status_code == 200
        before = http.post("/v1/collections/kept/query", json={"query": "mascot", "top_k": 1}).json()["data"]
    with live_server(env, wait_for=("embedding",)) as live, live.client() as http:
        assert http.get("/v1/collections/kept").json()["chunks"] == 3
        assert http.post("/v1/collections/kept/query", json={"query": "mascot", "top_k": 1}).json()["data"] == before
    # Vectors of another model are not comparable: a collection says so instead of answering wrongly.
    with live_server({**env, "EMBEDDING_MODEL_NAME": "another-model"}, wait_for=("embedding",)) as live:
        res = live.client().post("/v1/collections/kept/query", json={"query": "mascot"})
        assert error_of(res, 409)["code"] == "embedding_model_mismatch"


def test_hybrid_search_on_a_bge_m3_tier(tiny_bge_m3_path: Path, tmp_path: Path) -> None:
    env = {"EMBEDDING_MODEL_PATH": str(tiny_bge_m3_path), "COLLECTIONS_DIR": str(tmp_path)}
    with live_server(env, wait_for=("embedding",)) as live, live.client() as http:
        made = http.post("/v1/collections", json={"name": "hybrid"}).json()
        assert made["hybrid"] is True  # the tier has sparse vectors
        assert http.post("/v1/collections", json={"name": "dense", "hybrid": False}).json()["hybrid"] is False
        for name in ("hybrid", "dense"):
            assert http.post(f"/v1/collections/{name}/documents", json={"documents": DOCS}).status_code == 200
        hybrid = http.post("/v1/collections/hybrid/query", json={"query": "otter mascot", "top_k": 3}).json()
        dense = http.post("/v1/collections/dense/query", json={"query": "otter mascot", "top_k": 3}).json()
        assert (hybrid["hybrid"], dense["hybrid"], hybrid["reranked"]) == (True, False, False)
        assert {h["document_id"] for h in hybrid["data"]} == {d["id"] for d in DOCS}
        # Reciprocal-rank fusion (Qdrant's k = 2): a chunk scores 1/(rank + 2) in each list it is in.
        terms = [1 / 2, 1 / 3, 1 / 4]
        fused = {round(a, 6) for a in terms} | {round(a + b, 6) for a in terms for b in terms}
        assert all(any(abs(h["search_score"] - f) < 1e-5 for f in fused) for h in hybrid["data"]), hybrid["data"]
        assert not all(any(abs(h["search_score"] - f) < 1e-5 for f in fused) for h in dense["data"]), dense["data"]


def test_unreachable_server_store_is_a_503(minilm_path: str) -> None:
    env = {"EMBEDDING_MODEL_PATH": minilm_path, "COLLECTIONS_URL": "http://127.0.0.1:9"}  # discard port: refused
    with live_server(env, wait_for=("embedding",)) as live, live.client() as http:
        error = error_of(http.get("/v1/collections"), 503)
        assert error["code"] == "store_unavailable"
        assert http.get("/health").status_code == 200


def test_collections_need_the_rag_extra_only_when_used(gemma_gguf: str, tmp_path: Path) -> None:
    """The rest of the server works without a data folder ever being made (the store opens on use)."""
    with live_server({"LIGHT_MODEL_PATH": gemma_gguf, "LIGHT_N_CTX": "256", "COLLECTIONS_DIR": str(tmp_path / "d")},
                     wait_for=("light",)) as live:  # fmt: skip
        assert httpx.get(f"{live.url}/v1/models").status_code == 200
        assert not (tmp_path / "d").exists()
