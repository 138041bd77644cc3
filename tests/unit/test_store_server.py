"""COLLECTIONS_URL + COLLECTIONS_API_KEY: the Qdrant client sends the key to the server, and
GET /v1/config never shows it. The server is a stand-in that answers Qdrant's existence check."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kernel.errors import NotFoundError
from service.app import create_app
from service.settings import parse_settings
from service.testing import fake_engines
from stores.factory import create_store


@pytest.fixture
def qdrant_stub() -> Iterator[tuple[str, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path, "api-key": self.headers.get("api-key", "")})
            body = json.dumps({"result": {"exists": False}, "status": "ok", "time": 0.0}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_the_api_key_reaches_the_qdrant_server(qdrant_stub: tuple[str, list[dict[str, str]]]) -> None:
    url, seen = qdrant_stub
    store = create_store(path="unused", url=url, api_key="qdrant-secret")
    with pytest.raises(NotFoundError, match="Collection not found: kb"):
        store.collection("kb")
    assert seen and all(r["api-key"] == "qdrant-secret" for r in seen)
    assert seen[0]["path"].startswith("/collections/kb")


def test_the_api_key_is_never_shown_by_the_config_endpoint() -> None:
    from litestar.testing import TestClient

    settings = parse_settings({"EMBEDDING_MODEL_PATH": "fake/words", "COLLECTIONS_API_KEY": "qdrant-secret"})
    with TestClient(create_app(settings, engines=fake_engines()), base_url="http://localhost") as http:
        res = http.get("/v1/config")
        assert res.status_code == 200 and res.json()["server"]["collections_api_key"] == "********"
        assert "qdrant-secret" not in res.text
