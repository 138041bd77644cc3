"""Images on the three APIs, on fake engines: a tier with a projector gets them decoded (the fake
engine reads each as its size and digest, so the echo shows which image it saw); a text-only
tier answers a 400 naming the part and the tier; bad images are 400s, never 500s."""

from __future__ import annotations

import base64
import http.server
import io
import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient
from PIL import Image

from service.serving import images
from tests.live import fake_app


def data_url(color: tuple[int, int, int], size: tuple[int, int] = (2, 2), mode: str = "RGB") -> str:
    out = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


RED, BLUE = data_url((255, 0, 0)), data_url((0, 0, 255))


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:  # type: ignore[type-arg]
    env = {"LIGHT_MODEL_PATH": "fake/vlm", "LIGHT_MMPROJ_PATH": "fake/mmproj.gguf", "MEDIUM_MODEL_PATH": "fake/text"}
    with fake_app(env) as http:
        yield http


def chat(client: TestClient, url: str, model: str = "light", **part: Any) -> Any:  # type: ignore[type-arg]
    content = [{"type": "text", "text": "what is "}, {"type": "image_url", "image_url": {"url": url, **part}}]
    body = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": content}]}
    return client.post("/v1/chat/completions", json=body)


def test_two_images_two_answers_and_counted(client: TestClient) -> None:  # type: ignore[type-arg]
    red, blue = chat(client, RED, detail="low"), chat(client, BLUE)
    assert red.status_code == blue.status_code == 200, (red.text, blue.text)
    seen = [r.json()["choices"][0]["message"]["content"] for r in (red, blue)]
    assert seen[0].startswith("what is [image 2x2 ") and seen[0] != seen[1]
    plain = client.post(
        "/v1/chat/completions",
        json={"model": "light", "max_tokens": 64, "messages": [{"role": "user", "content": "what is "}]},
    )
    assert red.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": RED}}]}]
    tokenized = client.post("/tokenize", json={"model": "light", "messages": messages}).json()
    assert tokenized["count"] > 0 and "[image 2x2" in bytes(t for t in tokenized["tokens"] if t < 256).decode()


def test_anthropic_blocks_and_responses_parts_reach_the_model(client: TestClient) -> None:  # type: ignore[type-arg]
    b64 = RED.split(",", 1)[1]
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": [block]}
    messages = [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
        {"role": "user", "content": [result, {"type": "text", "text": "and "}, block]},
    ]
    res = client.post("/v1/messages", json={"model": "light", "max_tokens": 64, "messages": messages})
    assert res.status_code == 200, res.text
    assert "[image 2x2" in res.json()["content"][0]["text"]
    counted = client.post("/v1/messages/count_tokens", json={"model": "light", "messages": messages})
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0
    content = [{"type": "input_text", "text": "what is "}, {"type": "input_image", "image_url": BLUE, "detail": "auto"}]
    res = client.post("/v1/responses", json={"model": "light", "input": [{"role": "user", "content": content}]})
    assert res.status_code == 200, res.text
    assert "[image 2x2" in res.json()["output"][-1]["content"][0]["text"]


def test_a_text_only_tier_names_the_part_and_the_tier(client: TestClient) -> None:  # type: ignore[type-arg]
    res = chat(client, RED, model="medium")
    assert res.status_code == 400 and res.json()["error"]["param"] == "messages[0].content[1]"
    assert "tier medium" in res.json()["error"]["message"]
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": RED.split(",", 1)[1]}}
    body = {"model": "medium", "max_tokens": 8, "messages": [{"role": "user", "content": [block]}]}
    res = client.post("/v1/messages", json=body)
    assert res.status_code == 400 and "tier medium" in res.json()["error"]["message"]
    content = [{"type": "input_image", "image_url": RED}]
    res = client.post("/v1/responses", json={"model": "medium", "input": [{"role": "user", "content": content}]})
    assert res.status_code == 400 and res.json()["error"]["param"] == "input[0].content[0]"


def test_models_say_which_tiers_take_images(client: TestClient) -> None:  # type: ignore[type-arg]
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert [c.get("capabilities") for c in cards.values() if c["tier"] == "light"] == [["vision"]]
    assert all("capabilities" not in c for c in cards.values() if c["tier"] == "medium")


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "not an image"),
        ("data:image/png;base64,@@@", "base64"),
        (data_url((0, 0, 0), size=(5000, 5000), mode="1"), "5000x5000"),  # 3 KB of PNG, 25M pixels
        ("https://example.com/cat.png", "ALLOW_REMOTE_IMAGES"),
        ("file:///etc/passwd", "data URL"),
    ],
)
def test_bad_images_are_400s(client: TestClient, url: str, said: str) -> None:  # type: ignore[type-arg]
    res = chat(client, url)
    assert res.status_code == 400, res.text
    assert said in res.json()["error"]["message"] and res.json()["error"]["param"] == "messages[0].content[1]"


@pytest.mark.parametrize("size", [3, 320])  # a small image read on the loop; a 300 KB one, off it
def test_an_image_sent_again_is_not_decoded_again(
    client: TestClient,  # type: ignore[type-arg]
    monkeypatch: pytest.MonkeyPatch,
    size: int,
) -> None:
    noise = random.Random(size).randbytes(size * size * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), noise).save(out, format="PNG")
    b64 = base64.b64encode(out.getvalue()).decode()
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    where = set()  # the threads that decoded the base64: a large one never blocks the event loop
    real_base64 = images._base64
    monkeypatch.setattr(images, "_base64", lambda *a: where.add(threading.current_thread().name) or real_base64(*a))
    first, again = chat(client, "data:image/png;base64," + b64), chat(client, "data:image/jpeg;base64," + b64)
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}
    body = {"model": "light", "max_tokens": 64, "messages": [{"role": "user", "content": [block, block]}]}
    twice = client.post("/v1/messages", json=body)
    assert first.status_code == again.status_code == twice.status_code == 200, twice.text
    seen = first.json()["choices"][0]["message"]["content"]
    assert f"[image {size}x{size} " in seen and seen == again.json()["choices"][0]["message"]["content"]
    assert seen.removeprefix("what is ") in twice.json()["content"][0]["text"]
    assert len(opened) == 1  # once for the four: the same file, whatever its media type or API
    loop_thread = client.blocking_portal.call(lambda: threading.current_thread().name)
    assert (loop_thread in where) == (size == 3) and where


def test_text_spelling_the_marker_is_refused_on_a_vision_tier(client: TestClient) -> None:  # type: ignore[type-arg]
    body = {"model": "light", "max_tokens": 8, "messages": [{"role": "user", "content": "<__media__>"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 400
    assert client.post("/v1/chat/completions", json={**body, "model": "medium"}).status_code == 200


class _Images(http.server.BaseHTTPRequestHandler):
    """A local image host: /red.png, /big (past MAX_IMAGE_BYTES), /loop (redirects forever), else 404."""

    def do_GET(self) -> None:
        if self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
            return
        body = {"/red.png": base64.b64decode(RED.split(",", 1)[1]), "/big": b"x" * 4096}.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def remote() -> Iterator[tuple[TestClient, str]]:  # type: ignore[type-arg]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"LIGHT_MODEL_PATH": "fake/vlm", "LIGHT_MMPROJ_PATH": "fake/mmproj.gguf"}
    try:
        with fake_app({**env, "ALLOW_REMOTE_IMAGES": "true", "MAX_IMAGE_BYTES": "1024"}) as http_client:
            yield http_client, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def test_remote_images_are_fetched_when_allowed_within_bounds(remote: tuple[TestClient, str]) -> None:  # type: ignore[type-arg]
    client, base = remote
    fetched = chat(client, f"{base}/red.png")
    assert fetched.status_code == 200, fetched.text
    assert (
        fetched.json()["choices"][0]["message"]["content"]
        == chat(client, RED).json()["choices"][0]["message"]["content"]
    )
    for path, said in (("/big", "larger than 1024 bytes"), ("/missing", "HTTP 404"), ("/loop", "could not be fetched")):
        res = chat(client, base + path)
        assert res.status_code == 400 and said in res.json()["error"]["message"], res.text
