"""Images on the llama.cpp engine, through mtmd and a projector: a tiny random VLM built at test
time (a llama GGUF and a LLaVA "mlp" projector, tests/fixtures/tiny_vlm_gguf.py). The image changes the
greedy answer; its places count as prompt tokens; a later turn with the same image reuses its KV
and answers as a cold prompt would; images batch with each other and with text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from backends.base import IMAGE_MARKER, GenerationRequest, ImageInput
from backends.llamacpp.backend import LlamaCppBackend
from backends.llamacpp.vision import image_id, image_start
from kernel.config import TierSettings
from kernel.errors import InvalidRequestError
from tests.batching import batched
from tests.fixtures.mtmd_reference import ask, image, load_vlm, run
from tests.fixtures.tiny_vlm_gguf import IMAGE_TOKENS, build_tiny_vlm_gguf, require_mtmd

require_mtmd()


RED, BLUE = image(1), image(2)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppBackend]:
    backend = load_vlm(build_tiny_vlm_gguf(tmp_path_factory.mktemp("vlm"))[0])
    yield backend
    backend.close()


def test_the_image_changes_the_answer_and_counts(vlm: LlamaCppBackend) -> None:
    assert vlm.reads_images
    red, red_end = run(vlm, ask(RED))
    blue, _ = run(vlm, ask(BLUE))
    assert red != blue
    vlm.reset_prefix_cache()
    again, _ = run(vlm, ask(RED))
    assert again == red
    # Each of the image's embeddings is a prompt token, as llama-server counts them.
    prompt = vlm.tokens(ask(RED))
    assert prompt.count(image_id(RED.digest)) == IMAGE_TOKENS
    assert red_end.usage is not None and red_end.usage.prompt_tokens == len(prompt)
    text_only = vlm.tokens(GenerationRequest(messages=({"role": "user", "content": " what is it"},)))
    assert len(prompt) > len(text_only) + IMAGE_TOKENS - 4  # (the marker's spaces tokenize apart)


def test_a_later_turn_reuses_the_image_kv(vlm: LlamaCppBackend) -> None:
    first, _ = run(vlm, ask(RED))
    history = ({"role": "user", "content": f"{IMAGE_MARKER} what is it"}, {"role": "assistant", "content": first})
    turn = GenerationRequest(
        messages=(*history, {"role": "user", "content": "and now"}), images=(RED,), max_tokens=8, temperature=0.0
    )
    warm, warm_end = run(vlm, turn)
    start = vlm.tokens(turn).index(image_id(RED.digest))
    assert warm_end.usage is not None and warm_end.usage.cached_tokens >= start + IMAGE_TOKENS
    vlm.reset_prefix_cache()
    cold, cold_end = run(vlm, turn)
    assert cold_end.usage is not None and cold_end.usage.cached_tokens == 0
    assert warm == cold
    # Another image in its place: nothing after the text before it is reused.
    other = GenerationRequest(messages=turn.messages, images=(BLUE,), max_tokens=8, temperature=0.0)
    _, other_end = run(vlm, other)
    assert other_end.usage is not None and other_end.usage.cached_tokens <= start


def test_an_image_in_the_reused_prefix_is_not_encoded_again(
    vlm: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    vision = vlm._vision
    assert vision is not None
    encoded: list[int] = []
    evaluate = vision.evaluate
    monkeypatch.setattr(vision, "evaluate", lambda *a: encoded.append(1) or evaluate(*a))
    vlm.reset_prefix_cache()
    first, _ = run(vlm, ask(BLUE))
    assert encoded == [1]
    history = ({"role": "user", "content": f"{IMAGE_MARKER} what is it"}, {"role": "assistant", "content": first})
    turn = GenerationRequest(
        messages=(*history, {"role": "user", "content": "and now"}), images=(BLUE,), max_tokens=8, temperature=0.0
    )
    run(vlm, turn)
    assert encoded == [1]  # the projector never ran for the second turn: its KV came from the first


def test_images_batch_with_each_other_and_with_text(vlm: LlamaCppBackend) -> None:
    text = GenerationRequest(messages=({"role": "user", "content": "hello there"},), max_tokens=8, temperature=0.0)
    requests = [ask(RED), ask(BLUE), text]
    alone = []
    for request in requests:
        vlm.reset_prefix_cache()
        alone.append(run(vlm, request)[0])
    together = ["".join(t.text for t in tokens) for tokens in batched(vlm, requests[:2])]
    assert together == alone[:2]
    mixed = ["".join(t.text for t in tokens) for tokens in batched(vlm, [requests[0], requests[2]])]
    assert mixed == [alone[0], alone[2]]


def test_images_that_join_together_are_read_one_a_step(vlm: LlamaCppBackend) -> None:
    """Each image's first token comes once that image is read, not after every image that joined in
    the same step (and a decoding stream gets a token between encodes)."""
    vlm.reset_prefix_cache()
    batch = vlm.open_batch()
    try:
        for key, request in enumerate([ask(RED), ask(BLUE)]):
            batch.add(key, vlm.prepare(request))
        firsts: list[set[int]] = []
        seen: set[int] = set()
        while len(seen) < 2:
            new = {key for key, token in batch.step() if token is not None} - seen
            firsts.append(new)
            seen |= new
        assert [f for f in firsts if f] == [{0}, {1}], firsts  # one a step, in slot order
    finally:
        batch.close()


def test_two_images_in_one_prompt(vlm: LlamaCppBackend) -> None:
    def first_logprob(*images: ImageInput) -> float:
        request = ask(*images)
        scored = GenerationRequest(
            messages=request.messages, images=images, max_tokens=1, temperature=0.0, logprobs=True
        )
        chunks = list(vlm.stream(scored))
        token = chunks[0].scored[0].logprob
        assert token is not None
        return token.logprob

    # The random model's greedy text hardly depends on the order; its scores do.
    assert first_logprob(RED, BLUE) != first_logprob(BLUE, RED)
    assert vlm.tokens(ask(RED, BLUE)).count(image_id(BLUE.digest)) == IMAGE_TOKENS


def test_a_prefix_never_ends_inside_an_image(vlm: LlamaCppBackend) -> None:
    x, y = image_id(RED.digest), image_id(BLUE.digest)
    tokens = [1, 7, x, x, x, y, y, 8]
    assert [image_start(tokens, n) for n in range(9)] == [0, 1, 2, 2, 2, 5, 5, 7, 8]
    # A slot cut back to the middle of its image keeps only what comes before the image.
    slots = vlm.kv_slots
    run(vlm, ask(RED))
    slot = max(slots.slots, key=lambda s: len(s.tokens))
    start = slot.tokens.index(image_id(RED.digest))
    assert start > 0
    slot.busy = True
    try:
        assert slots._keep(slot, start + IMAGE_TOKENS // 2) == start
        assert len(slot.tokens) == start
    finally:
        slots.release(slot)


def test_bad_requests_are_refused(vlm: LlamaCppBackend) -> None:
    with pytest.raises(InvalidRequestError, match="images come in messages"):
        vlm.tokens(GenerationRequest(prompt="hi", images=(RED,)))
    marker_only = GenerationRequest(messages=({"role": "user", "content": IMAGE_MARKER},), images=(RED, BLUE))
    with pytest.raises(InvalidRequestError, match="could not read the images"):
        vlm.tokens(marker_only)


def test_text_only_model_path_without_projector(tmp_path: Path) -> None:
    model, projector = build_tiny_vlm_gguf(tmp_path)
    projector.unlink()
    backend = LlamaCppBackend(TierSettings(name="light", model_path=str(model), n_ctx=256), str(model))
    backend.load()
    try:
        assert not backend.reads_images
        with pytest.raises(InvalidRequestError, match="cannot read images"):
            backend.tokens(ask(RED))
    finally:
        backend.close()
