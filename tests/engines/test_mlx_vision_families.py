"""The VLM families users pull, on the MLX engine's own decode path (prefix cache, continuous
batching): tiny random models built at test time through mlx-vlm's loading code
(tests/fixtures/tiny_vlm_families.py), each answer checked against mlx-vlm's own `generate` on the
same model, prompt and image.

Qwen2-VL, Qwen2.5-VL: positions come from the image's grid (multimodal RoPE), so the text after an image sits
before its index; the tiny model's answers change when that shift is ignored.

Gemma 3: mlx-vlm 0.7.10's generate computes Gemma 3's image attention mask and never applies it (its
language model reads `mask`, the mask arrives as `attention_mask_4d`), so attention is causal
throughout there, as it is here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from backends.base import IMAGE_MARKER, GenerationRequest, ImageInput
from backends.mlx.backend import MlxBackend
from kernel.config import TierSettings
from tests.batching import batched
from tests.fixtures.tiny_vlm_families import (
    GEMMA3_TOKENS,
    QWEN2_VL_TOKENS,
    build_tiny_gemma3,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
)

N_CTX = 1024
MAX_TOKENS = 10
QUESTION = "What is in this picture?"
RED, BLUE = (255, 0, 0), (0, 0, 255)

FAMILIES: dict[str, tuple[Callable[[Path], Path], int]] = {
    "gemma3": (build_tiny_gemma3, GEMMA3_TOKENS),
    "qwen2_vl": (build_tiny_qwen2_vl, QWEN2_VL_TOKENS),
    "qwen2_5_vl": (build_tiny_qwen2_5_vl, QWEN2_VL_TOKENS),
}


def image(color: tuple[int, int, int]) -> ImageInput:
    rgb = Image.new("RGB", (32, 24), color).tobytes()
    return ImageInput(32, 24, rgb, hashlib.sha256(rgb).hexdigest())


def ask(color: tuple[int, int, int] | None, history: tuple[dict[str, str], ...] = ()) -> GenerationRequest:
    marker = IMAGE_MARKER if color is not None else ""
    images = (image(color),) if color is not None else ()
    first = {"role": "user", "content": f"{QUESTION}{marker}"}
    messages = (first, *history) if history else (first,)
    return GenerationRequest(messages=messages, images=images, max_tokens=MAX_TOKENS, temperature=0.0)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[MlxBackend, int]]:
    build, image_tokens = FAMILIES[request.param]
    folder = build(tmp_path_factory.mktemp(request.param))
    backend = MlxBackend(TierSettings(name="light", n_ctx=N_CTX), str(folder))
    backend.load()
    try:
        yield backend, image_tokens
    finally:
        backend.close()


def run(backend: MlxBackend, request: GenerationRequest) -> tuple[str, int, int]:
    """(text, prompt tokens, cached tokens) of one request on the engine's single-request path."""
    chunks = list(backend.stream(request))
    usage = chunks[-1].usage
    assert usage is not None
    return "".join(c.text for c in chunks), usage.prompt_tokens, usage.cached_tokens


def reference(backend: MlxBackend, request: GenerationRequest) -> str:
    """mlx-vlm's own greedy `generate` on the model the backend loaded, from the same prompt tokens."""
    from mlx_vlm import generate

    vision = backend._vision
    assert vision is not None
    assert request.messages is not None
    text = backend.render_chat(request.messages).replace(IMAGE_MARKER, vision._placeholder)
    bos = vision._processor.tokenizer.bos_token
    text = text.removeprefix(bos) if bos else text  # mlx-vlm keeps a doubled BOS; we drop it (the tokenizer adds one)
    prompt = backend.tokens(request)
    out = generate(
        vision._model,
        vision._processor,
        text,
        image=[Image.frombytes("RGB", (im.width, im.height), im.rgb) for im in request.images],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        verbose=False,
    )
    assert out.prompt_tokens == len(prompt)
    # Its streamed text drops a split UTF-8 character that ours shows as U+FFFD: compare the tokens' text.
    ids = [t for t in out.token_ids if t not in backend.eos_token_ids]
    return backend.detokenize(ids)


def test_two_images_two_answers_each_as_mlx_vlm_generates(family: tuple[MlxBackend, int]) -> None:
    backend, image_tokens = family
    backend.reset_prefix_cache()
    red, blue, plain = run(backend, ask(RED)), run(backend, ask(BLUE)), run(backend, ask(None))
    assert red[0] and red[0] != blue[0], (red, blue)
    assert red[1] - plain[1] >= image_tokens  # the image's tokens (and any markers around them) are counted
    assert [red[0], blue[0]] == [reference(backend, ask(RED)), reference(backend, ask(BLUE))]
    # The text-only prompt took the text before an image from an image sequence's cache: it answers
    # as from a cold start (no position shift carried over from that image).
    assert plain[2] > 0
    backend.reset_prefix_cache()
    assert run(backend, ask(None))[0] == plain[0]


def test_a_second_turn_with_the_image_reuses_its_kv(family: tuple[MlxBackend, int]) -> None:
    backend, _ = family
    backend.reset_prefix_cache()
    first = run(backend, ask(BLUE))
    again = run(backend, ask(BLUE))
    assert again[0] == first[0] and again[2] == first[1] - 1
    history = ({"role": "assistant", "content": first[0]}, {"role": "user", "content": "And the colour?"})
    cold = ask(BLUE, history)
    second = run(backend, cold)
    assert second[2] >= first[1]  # the whole first turn, image included, came from the prefix cache
    backend.reset_prefix_cache()
    assert run(backend, cold)[0] == second[0]  # and answered as a cold start does


def test_a_batch_with_a_text_sequence_answers_as_one_at_a_time(family: tuple[MlxBackend, int]) -> None:
    backend, _ = family
    assert backend.max_batch_size > 1
    requests = [ask(RED), ask(None), ask(BLUE)]
    alone = []
    for r in requests:
        backend.reset_prefix_cache()
        alone.append(run(backend, r)[0])
    together = ["".join(t.text for t in tokens) for tokens in batched(backend, requests)]
    assert together == alone, (together, alone)
