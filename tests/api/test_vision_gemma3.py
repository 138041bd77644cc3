"""Gemma 3 images on a live server (the tiny random Gemma 3 and its `gemma3` projector,
tests/fixtures/tiny_gemma3_vlm_gguf.py): `/tokenize` lists the vocabulary ids around an image and
the image's places apart (`images`), counted as generation counts them; a tier whose N_BATCH is
smaller than an image (which Gemma 3 reads in one piece) answers a 400 naming N_BATCH."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from tests.fixtures.tiny_gemma3_vlm_gguf import BEGIN, END, IMAGE_TOKENS, build_tiny_gemma3_vlm_gguf
from tests.fixtures.tiny_vlm_gguf import require_mtmd
from tests.live import LiveServer, error_of, live_server

require_mtmd()


def png(seed: int) -> str:
    pixels = bytes((seed * 97 + i * 31) % 256 for i in range(12 * 12 * 3))
    out = io.BytesIO()
    Image.frombytes("RGB", (12, 12), pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    model, _ = build_tiny_gemma3_vlm_gguf(tmp_path_factory.mktemp("gemma3"))
    env = {
        "LIGHT_MODEL_PATH": str(model),
        "LIGHT_N_CTX": "512",
        "LIGHT_MAX_TOKENS": "4",
        "LIGHT_TEMPERATURE": "0",
        # The same model read with a batch smaller than an image.
        "MEDIUM_MODEL_PATH": str(model),
        "MEDIUM_N_CTX": "256",
        "MEDIUM_N_BATCH": str(IMAGE_TOKENS - 1),
        "ENABLE_CACHE": "false",
    }
    with live_server(env, wait_for=("light", "medium")) as live:
        yield live


def user(*images: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "what is it"}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": parts}]


def test_tokenize_lists_the_images_apart(server: LiveServer) -> None:
    with server.client() as http:
        special = http.post("/tokenize", json={"model": "light", "prompt": BEGIN + END}).json()["tokens"][-2:]
        red, blue = png(1), png(2)
        one = http.post("/tokenize", json={"model": "light", "messages": user(red)}).json()
        assert all(t >= 0 for t in one["tokens"])
        [image] = one["images"]
        assert image["index"] == 0 and image["tokens"] == IMAGE_TOKENS
        # mtmd wraps the image in Gemma 3's markers: the image goes between them.
        assert one["tokens"][image["offset"] - 1 : image["offset"] + 1] == special
        assert one["count"] == len(one["tokens"]) + IMAGE_TOKENS
        chat = http.post("/v1/chat/completions", json={"model": "light", "messages": user(red)}).json()
        assert chat["usage"]["prompt_tokens"] == one["count"]
        text = http.post("/detokenize", json={"model": "light", "tokens": one["tokens"]}).json()["prompt"]
        assert BEGIN + END in text
        two = http.post("/tokenize", json={"model": "light", "messages": user(red, blue)}).json()
        assert [i["index"] for i in two["images"]] == [0, 1]
        assert two["count"] == len(two["tokens"]) + 2 * IMAGE_TOKENS
        assert two["images"][0]["offset"] < two["images"][1]["offset"]
        plain = http.post("/tokenize", json={"model": "light", "prompt": "hi"}).json()
        assert plain["images"] == [] and plain["count"] == len(plain["tokens"])


def test_an_image_larger_than_n_batch_is_a_400(server: LiveServer) -> None:
    with server.client() as http:
        res = http.post("/v1/chat/completions", json={"model": "medium", "messages": user(png(1))})
        error = error_of(res, 400)
        assert "N_BATCH" in str(error["message"]) and error["type"] == "invalid_request_error"
