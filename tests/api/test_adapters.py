"""LoRA adapters over HTTP on the real Gemma 3 270M GGUF: listing, admin load/unload, per-request
selection on every generation endpoint, 404 adapter_not_found, batching and the response cache."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from tests.fixtures.lora import build_gguf_lora
from tests.live import LiveServer, completion_text, live_server

USER = {"Authorization": "Bearer user-key"}
ADMIN = {"Authorization": "Bearer admin-key"}


@pytest.fixture(scope="module")
def models_dir(gemma_gguf: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    build_gguf_lora(gemma_gguf, folder / "random.gguf", zero=False, seed=2, scale=0.1)
    build_gguf_lora(gemma_gguf, folder / "zero.gguf", zero=True)
    build_gguf_lora(gemma_gguf, folder / "other.gguf", zero=False, seed=2, scale=0.03)
    return folder


@pytest.fixture(scope="module")
def server(gemma_gguf: str, minilm_path: str, models_dir: Path) -> Iterator[LiveServer]:
    env = {
        "LIGHT_MODEL_PATH": gemma_gguf,
        "LIGHT_N_CTX": "512",
        "LIGHT_TEMPERATURE": "0",
        "LIGHT_REPEAT_PENALTY": "1.0",
        "LIGHT_MAX_BATCH": "3",
        "LIGHT_ADAPTERS": f"random={models_dir / 'random.gguf'}",
        "EMBEDDING_MODEL_PATH": minilm_path,  # RAG chat with an adapter
        "MODELS_DIR": str(models_dir),
        "API_KEYS": "user-key",
        "ADMIN_API_KEYS": "admin-key",
        "ENABLE_CACHE": "true",
    }
    with live_server(env, wait_for=("light", "embedding")) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(headers=USER) as c:
        yield c


def complete(client: httpx.Client, prompt: str, model: str = "light", **extra: Any) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 12, **extra})


def cards(client: httpx.Client) -> dict[str, dict[str, Any]]:
    body = client.get("/v1/adapters").json()
    assert body["object"] == "list"
    return {card["id"]: card for card in body["data"]}


def test_configured_adapter_is_listed_with_rank_and_size(client: httpx.Client, models_dir: Path) -> None:
    card = cards(client)["random"]
    assert card["object"] == "adapter" and card["tier"] == "light" and card["model"].startswith("light/")
    assert (card["status"], card["source"], card["rank"]) == ("loaded", "settings", 4)
    assert card["size_bytes"] == (models_dir / "random.gguf").stat().st_size
    assert card["path"] == str(models_dir / "random.gguf")


def test_load_and_unload_need_admin_and_stay_inside_models_dir(server: LiveServer, client: httpx.Client) -> None:
    body = {"model": "light", "adapter": "zero", "path": "zero.gguf"}
    assert client.post("/v1/adapters/load", json=body).status_code == 403
    with server.client(headers=ADMIN) as admin:
        for path in ("../models/zero.gguf", "/etc/passwd", "missing.gguf"):
            refused = admin.post("/v1/adapters/load", json={**body, "path": path})
            assert refused.status_code in (400, 403), refused.text
            assert refused.json()["error"]["param"] == "path"
        bad_name = admin.post("/v1/adapters/load", json={**body, "adapter": "a:b"})
        assert bad_name.status_code == 400
        loaded = admin.post("/v1/adapters/load", json=body)
        assert loaded.status_code == 200, loaded.text
        assert (loaded.json()["status"], loaded.json()["source"], loaded.json()["rank"]) == ("loaded", "runtime", 4)
        assert admin.post("/v1/adapters/load", json={**body, "path": "other.gguf"}).json()["error"]["code"] == (
            "adapter_exists"
        )
        base = completion_text(complete(client, "The capital of France is"))
        assert completion_text(complete(client, "The capital of France is", "light:zero")) == base  # lora_b = 0
        assert cards(client)["zero"]["usage_count"] == 1
        unloaded = admin.post("/v1/adapters/unload", json={"model": "light", "adapter": "zero"})
        assert unloaded.status_code == 200 and unloaded.json()["status"] == "unloaded"
        assert "zero" not in cards(client)
        gone = complete(client, "The capital of France is", "light:zero")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "adapter_not_found"


def test_adapter_is_chosen_per_request_on_every_endpoint(client: httpx.Client) -> None:
    base = completion_text(complete(client, "A B C D E F G"))
    tuned = completion_text(complete(client, "A B C D E F G", "light:random"))
    assert tuned != base
    assert completion_text(complete(client, "A B C D E F G", adapter="random")) == tuned
    conflict = complete(client, "A B C D E F G", "light:random", adapter="other")
    assert conflict.status_code == 400
    chat = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}
    plain = client.post("/v1/chat/completions", json={"model": "light", **chat}).json()
    adapted = client.post("/v1/chat/completions", json={"model": "light", "adapter": "random", **chat})
    assert adapted.status_code == 200
    assert adapted.json()["choices"][0]["message"] != plain["choices"][0]["message"]
    responses = {"model": "light", "input": "Name a colour.", "max_output_tokens": 8}
    messages = {"model": "light", "max_tokens": 8, "messages": [{"role": "user", "content": "Name a colour."}]}
    for path, payload in (("/v1/responses", responses), ("/v1/messages", messages)):
        assert client.post(path, json={**payload, "adapter": "random"}).status_code == 200
        missing = client.post(path, json={**payload, "adapter": "nope"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found", path
        missing = client.post(path, json={**payload, "model": "light:nope"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found", path


def test_unknown_adapter_is_404_naming_the_ones_there(client: httpx.Client) -> None:
    response = complete(client, "Hi", "light:nope")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "adapter_not_found" and "random" in error["message"] and error["param"] == "model"
    assert complete(client, "Hi", adapter="nope").json()["error"]["param"] == "adapter"


def test_concurrent_requests_with_different_adapters_each_get_their_own_output(client: httpx.Client) -> None:
    # Continuations each model is sure of (see tests/engines/test_lora_llamacpp.py).
    cases = [("light", "1, 2, 3, 4, 5, 6,"), ("light:random", "A B C D E F G"), ("light", "A B C D E F G")]
    solo = [completion_text(complete(client, prompt, model)) for model, prompt in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        # A stop string never produced: a different cache key from the solo runs, so these decode.
        together = list(pool.map(lambda c: completion_text(complete(client, c[1], c[0], stop=["\u2063"])), cases))
    assert together == solo
    assert solo[1] != solo[2]


def test_response_cache_keys_on_the_adapter(client: httpx.Client) -> None:
    prompt = "Once upon a time"
    base = complete(client, prompt)
    tuned = complete(client, prompt, "light:random")
    assert completion_text(tuned) != completion_text(base)  # not the base model's cached answer
    again = complete(client, prompt, "light:random")
    assert completion_text(again) == completion_text(tuned)
    details = again.json()["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] == again.json()["usage"]["prompt_tokens"]  # a response-cache hit


def test_batch_lines_and_rag_chat_take_tier_colon_adapter(client: httpx.Client) -> None:
    """They resolve model + adapter where every other route does (issue 30: they answered 404)."""
    direct = completion_text(complete(client, "A B C D E F G", "light:random"))
    lines = [
        {"custom_id": name, "method": "POST", "url": "/v1/completions",
         "body": {"model": model, "prompt": "A B C D E F G", "max_tokens": 12}}
        for name, model in (("colon", "light:random"), ("field", "light"), ("missing", "light:nope"))
    ]  # fmt: skip
    lines[1]["body"]["adapter"] = "random"
    upload = client.post(
        "/v1/files",
        files={"file": ("lines.jsonl", "\n".join(map(json.dumps, lines)).encode())},
        data={"purpose": "batch"},
    )
    assert upload.status_code == 200, upload.text
    created = client.post(
        "/v1/batches",
        json={"input_file_id": upload.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"},
    )
    assert created.status_code == 200, created.text
    deadline = time.monotonic() + 120
    while (batch := client.get(f"/v1/batches/{created.json()['id']}").json())["status"] != "completed":
        assert time.monotonic() < deadline and batch["status"] in ("validating", "in_progress", "finalizing"), batch
        time.sleep(0.1)
    done = [json.loads(x) for x in client.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()]
    texts = {line["custom_id"]: line["response"]["body"]["choices"][0]["text"] for line in done}
    assert texts == {"colon": direct, "field": direct}
    failed = json.loads(client.get(f"/v1/files/{batch['error_file_id']}/content").text)
    assert failed["response"]["status_code"] == 404
    assert failed["response"]["body"]["error"]["code"] == "adapter_not_found"

    admin = {"Authorization": ADMIN["Authorization"]}
    assert client.post("/v1/collections", json={"name": "lora"}, headers=admin).status_code == 200
    docs = {"documents": [{"text": "The mascot is a purple otter named Quill."}]}
    assert client.post("/v1/collections/lora/documents", json=docs, headers=admin).status_code == 200
    ask = {"messages": [{"role": "user", "content": "Who is the mascot?"}], "max_tokens": 8}
    url = "/v1/collections/lora/chat/completions"
    colon = client.post(url, json={**ask, "model": "light:random"})
    assert colon.status_code == 200, colon.text
    field = client.post(url, json={**ask, "model": "light", "adapter": "random"})
    assert colon.json()["choices"][0]["message"] == field.json()["choices"][0]["message"]
    missing = client.post(url, json={**ask, "model": "light:nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found"
