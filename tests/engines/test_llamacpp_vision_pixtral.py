"""Mistral Small 3.x images on the llama.cpp engine: a tiny random llama LLM with a `pixtral`
projector (2D RoPE inside the vision encoder, a patch merger, `[IMG_BREAK]` after each row and
`[IMG_END]` after the image), built at test time (tests/fixtures/tiny_pixtral_gguf.py). An image's
token count follows its size; the batched engine, cold or reusing a slot's KV, answers what mtmd's
own single-sequence evaluation answers (tests/fixtures/mtmd_reference.py), greedy."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from backends.base import IMAGE_MARKER
from backends.llamacpp.backend import LlamaCppBackend
from backends.llamacpp.vision import image_id
from tests.batching import batched
from tests.fixtures.mtmd_reference import Reference, ask, expected, image, load_vlm, run, scored, scored_run
from tests.fixtures.tiny_pixtral_gguf import END, MERGE, PATCH, build_tiny_pixtral_gguf
from tests.fixtures.tiny_vlm_gguf import require_mtmd

require_mtmd()

RED, BLUE = image(1, size=24), image(2, size=24)
WIDE = image(3, size=40)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_pixtral_gguf(tmp_path_factory.mktemp("pixtral"))


@pytest.fixture(scope="module")
def vlm(files: tuple[Path, Path]) -> Iterator[LlamaCppBackend]:
    backend = load_vlm(files[0])
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference(files: tuple[Path, Path]) -> Iterator[Reference]:
    ref = Reference(*files)
    yield ref
    ref.close()


def test_an_image_takes_places_by_its_size(vlm: LlamaCppBackend) -> None:
    assert vlm.reads_images
    side = 24 // PATCH // MERGE  # a 24 x 24 image: 3 x 3 merged patches, a break after each row but the last
    prompt = vlm.tokens(ask(RED))
    start = prompt.index(image_id(RED.digest))
    assert prompt.count(image_id(RED.digest)) == side * side + side - 1
    assert prompt[start + side * side + side - 1] == vlm.encode(END)[-1]
    assert vlm.tokens(ask(WIDE)).count(image_id(WIDE.digest)) > side * side + side - 1
    _, last = run(vlm, ask(RED))
    assert last.usage is not None and last.usage.prompt_tokens == len(prompt)


def test_two_images_two_answers_as_mtmd_gives_them(vlm: LlamaCppBackend, reference: Reference) -> None:
    answers = []
    for im in (RED, BLUE, WIDE):
        vlm.reset_prefix_cache()
        answer = scored(vlm, ask(im))
        assert answer == expected(vlm, reference, ask(im))
        answers.append(answer)
    assert answers[0].text != answers[1].text


def test_a_second_turn_reuses_the_image_and_answers_as_a_cold_slot(vlm: LlamaCppBackend, reference: Reference) -> None:
    vlm.reset_prefix_cache()
    first, _ = run(vlm, ask(BLUE))
    history = ({"role": "user", "content": f"{IMAGE_MARKER} what is it"}, {"role": "assistant", "content": first})
    turn = replace(ask(text="and now", history=history), images=(BLUE,))
    warm, warm_end = scored_run(vlm, turn)
    start = vlm.tokens(turn).index(image_id(BLUE.digest))
    assert warm_end.usage is not None and warm_end.usage.cached_tokens > start
    vlm.reset_prefix_cache()
    cold, cold_end = scored_run(vlm, turn)
    assert cold_end.usage is not None and cold_end.usage.cached_tokens == 0
    assert warm == cold == expected(vlm, reference, turn)


def test_images_batch_with_text(vlm: LlamaCppBackend) -> None:
    requests = [ask(WIDE), ask(text="hello there, what is new")]
    alone = []
    for request in requests:
        vlm.reset_prefix_cache()
        alone.append(run(vlm, request)[0])
    together = ["".join(t.text for t in tokens) for tokens in batched(vlm, requests)]
    assert together == alone
