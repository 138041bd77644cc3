"""Images through the three SDKs on a live server, on llama.cpp with a projector: the tiny random
VLM built at test time (a llama GGUF and a LLaVA "mlp" mmproj beside it, tests/fixtures/tiny_vlm_gguf.py).
Greedy: two images give two answers and the same image the same one, whichever API it came
through; its embeddings count as prompt tokens; a second turn reuses the image's KV; a bad image
is a 400."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from PIL import Image

from tests.fixtures.tiny_vlm_gguf import IMAGE_TOKENS, build_tiny_vlm_gguf, require_mtmd
from tests.live import LiveServer, live_server

require_mtmd()


def png(seed: int) -> str:
    """Base64 PNG of 12x12 pseudo-random pixels."""
    pixels = bytes((seed * 97 + i * 31) % 256 for i in range(12 * 12 * 3))
    out = io.BytesIO()
    Image.frombytes("RGB", (12, 12), pixels).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


RED, BLUE = png(1), png(2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    model, _ = build_tiny_vlm_gguf(tmp_path_factory.mktemp("vlm"))
    env = {
        "LIGHT_MODEL_PATH": str(model),
        "LIGHT_BACKEND": "llamacpp",
        "LIGHT_N_CTX": "512",
        "LIGHT_MAX_TOKENS": "8",
        "LIGHT_TEMPERATURE": "0",
        "ENABLE_CACHE": "false",
    }
    with live_server(env, wait_for=("light",)) as live:
        yield live


def openai_chat(server: LiveServer, image: str, text: str = "what is it") -> Any:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    content: Any = [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
    ]
    return client.chat.completions.create(model="light", messages=[{"role": "user", "content": content}])


def test_openai_two_images_two_answers_counted(server: LiveServer) -> None:
    red, blue, again = openai_chat(server, RED), openai_chat(server, BLUE), openai_chat(server, RED)
    assert red.choices[0].message.content != blue.choices[0].message.content
    assert again.choices[0].message.content == red.choices[0].message.content
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    plain = client.chat.completions.create(model="light", messages=[{"role": "user", "content": "what is it"}])
    assert red.usage is not None and plain.usage is not None
    assert red.usage.prompt_tokens >= plain.usage.prompt_tokens + IMAGE_TOKENS - 2
    models = client.models.list()
    light = next(m for m in models.data if (m.model_extra or {}).get("tier") == "light")
    assert (light.model_extra or {}).get("capabilities") == ["vision"]


def test_second_turn_reuses_the_image(server: LiveServer) -> None:
    first = openai_chat(server, BLUE, "describe")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    image: Any = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{BLUE}"}}
    messages: Any = [
        {"role": "user", "content": [{"type": "text", "text": "describe"}, image]},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "more"},
    ]
    second = client.chat.completions.create(model="light", messages=messages)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert (second.usage.prompt_tokens_details.cached_tokens or 0) > IMAGE_TOKENS


def test_anthropic_and_langchain_see_the_same_image(server: LiveServer) -> None:
    expected = openai_chat(server, RED).choices[0].message.content
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    block: Any = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": RED}}
    message = claude.messages.create(
        model="light",
        max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "text", "text": "what is it"}, block]}],
    )
    # Anthropic counts the tokens read from the cache apart from input_tokens.
    total = message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    assert total > IMAGE_TOKENS
    count = claude.messages.count_tokens(
        model="light", messages=[{"role": "user", "content": [{"type": "text", "text": "what is it"}, block]}]
    )
    assert count.input_tokens == total
    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="x", model="light", max_tokens=8, max_retries=0)  # type: ignore[arg-type]

    def ask(image: str) -> Any:
        url = f"data:image/png;base64,{image}"
        parts: list[Any] = [{"type": "text", "text": "what is it"}, {"type": "image_url", "image_url": {"url": url}}]
        return llm.invoke([HumanMessage(content=parts)]).content

    assert ask(RED) == expected
    assert ask(BLUE) != expected


def test_a_bad_image_is_a_400(server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_chat(server, base64.b64encode(b"not an image").decode())
    assert "image" in str(caught.value)
