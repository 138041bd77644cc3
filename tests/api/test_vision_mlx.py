"""A vision-language model on an MLX tier, through mlx-vlm: a tiny random LLaVA built at test time
(tests/fixtures/tiny_vlm.py) on a live server, driven with the openai, anthropic and LangChain clients.

The server runs one request at a time (MAX_BATCH=1: mlx-lm's `generate_step`); in-process, the same
images in one engine batch (`BatchGenerator`) must give the answers they give one at a time.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from openai import BadRequestError, OpenAI
from PIL import Image

from backends.base import IMAGE_MARKER, GenerationRequest, ImageInput
from backends.mlx.backend import MlxBackend
from kernel.config import TierSettings
from tests.batching import batched
from tests.fixtures.tiny_vlm import IMAGE_TOKENS, build_tiny_vlm
from tests.live import LiveServer, live_server

N_CTX = 2048
QUESTION = "What is in this picture?"


def png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(out, format="PNG")
    return out.getvalue()


RED, BLUE = png((255, 0, 0)), png((0, 0, 255))


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))


@pytest.fixture(scope="module")
def server(model: Path) -> Iterator[LiveServer]:
    env = {
        "LIGHT_MODEL_PATH": str(model),
        "LIGHT_BACKEND": "mlx",
        "LIGHT_N_CTX": str(N_CTX),
        "LIGHT_TEMPERATURE": "0",
        "LIGHT_MAX_BATCH": "1",
        "ENABLE_CACHE": "false",  # every request reaches the engine
    }
    with live_server(env, wait_for=("light",)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def ask(client: OpenAI, image: bytes | None, text: str = QUESTION) -> Any:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    return client.chat.completions.create(
        model="light",
        messages=[{"role": "user", "content": content}],  # type: ignore[misc,list-item]
        max_tokens=12,
        temperature=0,
    )


def test_the_image_steers_the_answer_and_its_tokens_are_counted(client: OpenAI) -> None:
    red, blue, red_again = ask(client, RED), ask(client, BLUE), ask(client, RED)
    answers = [r.choices[0].message.content for r in (red, blue, red_again)]
    assert answers[0] and answers[0] != answers[1], answers
    assert answers[2] == answers[0]
    plain = ask(client, None)
    assert red.usage.prompt_tokens - plain.usage.prompt_tokens == IMAGE_TOKENS
    # The second red request reuses the first one's KV, images included; blue shares only the text before it.
    assert red_again.usage.prompt_tokens_details.cached_tokens == red.usage.prompt_tokens - 1
    assert blue.usage.prompt_tokens_details.cached_tokens < red.usage.prompt_tokens - IMAGE_TOKENS


def test_a_second_turn_reuses_the_images_kv(client: OpenAI) -> None:
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(BLUE)}}]}]
    one = client.chat.completions.create(model="light", messages=first, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    history = [*first, {"role": "assistant", "content": one.choices[0].message.content}]
    two = client.chat.completions.create(
        model="light",
        messages=[*history, {"role": "user", "content": "And the colour?"}],  # type: ignore[list-item]
        max_tokens=6,
        temperature=0,
    )
    assert two.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens


def test_messages_and_responses_read_the_images_too(client: OpenAI, server: LiveServer) -> None:
    said: dict[str, list[str]] = {"messages": [], "responses": []}
    with anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0) as sdk:
        for image in (RED, BLUE):
            source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(image).decode()}
            content = [{"type": "text", "text": QUESTION}, {"type": "image", "source": source}]
            message = sdk.messages.create(
                model="light",
                max_tokens=12,  # greedy: the tier's TEMPERATURE is 0
                messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
            )
            usage = message.usage  # Anthropic's input_tokens leaves out those read from the cache
            assert usage.input_tokens + (usage.cache_read_input_tokens or 0) > IMAGE_TOKENS
            said["messages"].append(message.content[0].text)  # type: ignore[union-attr]
    for image in (RED, BLUE):
        response = client.responses.create(
            model="light",
            max_output_tokens=12,
            temperature=0,
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": QUESTION},
                        {"type": "input_image", "image_url": data_url(image), "detail": "auto"},
                    ],
                }
            ],
        )
        assert response.usage is not None and response.usage.input_tokens > IMAGE_TOKENS
        said["responses"].append(response.output_text)
    assert all(red and red != blue for red, blue in said.values()), said


def test_langchain_sends_images_as_the_openai_sdk_does(client: OpenAI, server: LiveServer) -> None:
    llm = ChatOpenAI(
        base_url=f"{server.url}/v1", api_key="x", model="light", max_tokens=12, temperature=0, max_retries=0
    )  # type: ignore[arg-type]

    def said(image: bytes) -> Any:
        parts: list[Any] = [
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": data_url(image)}},
        ]
        message = llm.invoke([HumanMessage(content=parts)])
        assert message.usage_metadata is not None and message.usage_metadata["input_tokens"] > IMAGE_TOKENS
        return message.content

    red, blue = said(RED), said(BLUE)
    assert red == ask(client, RED).choices[0].message.content and red != blue


def test_bad_images_are_400s_and_the_tier_says_it_reads_images(client: OpenAI) -> None:
    with pytest.raises(BadRequestError) as raised:
        ask(client, b"not an image at all")
    assert raised.value.status_code == 400
    sliver = io.BytesIO()
    Image.new("RGB", (1, 2000), (9, 9, 9)).save(sliver, format="PNG")
    with pytest.raises(BadRequestError) as raised:  # its short side scaled up would be 56 x 112,000
        ask(client, sliver.getvalue())
    assert "1x2000" in raised.value.message
    with pytest.raises(BadRequestError) as raised:  # the model's own image token spelled in the text
        ask(client, RED, text="What is <image> here?")
    assert "<image>" in raised.value.message
    cards = [m.model_dump() for m in client.models.list().data]
    assert [c.get("capabilities") for c in cards if c.get("tier") == "light"] == [["vision"]]


def test_a_batch_gives_the_answers_one_request_at_a_time_gives(model: Path) -> None:
    backend = MlxBackend(TierSettings(name="light", n_ctx=N_CTX), str(model))
    backend.load()
    try:
        assert backend.max_batch_size > 1 and backend.reads_images

        def request(color: tuple[int, int, int]) -> GenerationRequest:
            rgb = Image.new("RGB", (32, 24), color).tobytes()
            messages = ({"role": "user", "content": f"{QUESTION}{IMAGE_MARKER}"},)
            image = ImageInput(32, 24, rgb, hashlib.sha256(rgb).hexdigest())
            return GenerationRequest(messages=messages, images=(image,), max_tokens=12, temperature=0.0)

        requests = [request((255, 0, 0)), request((0, 0, 255)), request((255, 0, 0))]
        alone = []
        for r in requests:
            backend.reset_prefix_cache()
            alone.append("".join(c.text for c in backend.stream(r)))
        together = ["".join(t.text for t in tokens) for tokens in batched(backend, requests)]
        assert together == alone and alone[0] != alone[1], (together, alone)
    finally:
        backend.close()


def test_tokenize_lists_the_image_apart(server: LiveServer) -> None:
    """The shape llama.cpp answers too: the vocabulary ids around the image, its places in `images`."""
    content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": data_url(RED)}}]
    with server.client() as http:
        body = http.post("/tokenize", json={"model": "light", "messages": [{"role": "user", "content": content}]})
    tokenized = body.json()
    [image] = tokenized["images"]
    assert image["index"] == 0 and image["tokens"] == IMAGE_TOKENS
    assert 0 < image["offset"] <= len(tokenized["tokens"])
    assert tokenized["count"] == len(tokenized["tokens"]) + IMAGE_TOKENS
