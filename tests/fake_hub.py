"""A stand-in Hugging Face hub for the pull tests, served by the test itself on a free port (pointed at
with HF_ENDPOINT): the tree listing huggingface_hub's `list_repo_tree` reads, and `resolve/<rev>/<file>`
with the headers a download needs (ETag, X-Linked-Etag/-Size, X-Repo-Commit, Content-Length,
Range -> 206). `cut_once` drops the connection half-way through one download; `held` pauses one
half-way until the test lets it go on; `corrupt` serves bytes other than the listed sha256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo -> path -> content
    cut_once: set[str] = field(default_factory=set)  # file paths whose next GET is cut mid-way
    corrupt: set[str] = field(default_factory=set)  # file paths served with one byte flipped
    # file paths whose GET sends half its body, then waits for the event before the rest
    held: dict[str, threading.Event] = field(default_factory=dict)
    lfs: bool = True  # GGUF/safetensors files listed as LFS (sha256); the rest by git blob id
    ranges: list[str] = field(default_factory=list)  # Range headers received, in order
    url: str = ""

    def __post_init__(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                hub._handle(self, body=True)

            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _entry(self, path: str, content: bytes) -> dict[str, object]:
        blob = hashlib.sha1(b"blob %d\0" % len(content) + content, usedforsecurity=False).hexdigest()
        entry: dict[str, object] = {"type": "file", "path": path, "size": len(content), "oid": blob}
        if self.lfs and path.endswith((".gguf", ".safetensors")):
            entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
        return entry

    def _handle(self, request: BaseHTTPRequestHandler, *, body: bool) -> None:
        parts = [unquote(p) for p in urlparse(request.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            files = self.repos.get(f"{parts[2]}/{parts[3]}")
            if files is None:
                return self._send(request, 404, b'{"error":"Repository not found"}', body=body)
            listing = [self._entry(p, c) for p, c in sorted(files.items())]
            return self._send(request, 200, json.dumps(listing).encode(), body=body, kind="application/json")
        if len(parts) >= 5 and parts[2] == "resolve":
            files = self.repos.get(f"{parts[0]}/{parts[1]}", {})
            path = "/".join(parts[4:])
            if path not in files:
                return self._send(request, 404, b"Entry not found", body=body)
            return self._file(request, path, files[path], body=body)
        self._send(request, 404, b"not found", body=body)

    def _file(self, request: BaseHTTPRequestHandler, path: str, content: bytes, *, body: bool) -> None:
        sha = hashlib.sha256(content).hexdigest()
        if path in self.corrupt:
            content = bytes([content[0] ^ 0xFF]) + content[1:]
        start, status = 0, 200
        if given := request.headers.get("Range"):
            self.ranges.append(given)
            start, status = int(given.removeprefix("bytes=").split("-")[0]), 206
        piece = content[start:]
        request.send_response(status)
        request.send_header("Content-Length", str(len(piece)))
        request.send_header("ETag", f'"{sha}"')
        request.send_header("X-Linked-Etag", f'"{sha}"')
        request.send_header("X-Linked-Size", str(len(content)))
        request.send_header("X-Repo-Commit", COMMIT)
        request.send_header("Accept-Ranges", "bytes")
        if status == 206:
            request.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        request.end_headers()
        if not body:
            return
        if body and path in self.cut_once and request.command == "GET":
            self.cut_once.discard(path)
            request.wfile.write(piece[: len(piece) // 2])
            request.wfile.flush()
            request.close_connection = True
            request.connection.shutdown(2)  # the peer sees the body end short: a cut download
            return
        if (hold := self.held.get(path)) is not None and request.command == "GET":
            request.wfile.write(piece[: len(piece) // 2])
            request.wfile.flush()
            hold.wait(30)
            with contextlib.suppress(ConnectionError):  # the puller stopped and went away: the test's point
                request.wfile.write(piece[len(piece) // 2 :])
            return
        request.wfile.write(piece)

    def _send(
        self, request: BaseHTTPRequestHandler, status: int, data: bytes, *, body: bool, kind: str = "text/plain"
    ) -> None:
        request.send_response(status)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(data)))
        request.send_header("X-Repo-Commit", COMMIT)
        request.end_headers()
        if body:
            request.wfile.write(data)
