"""Gemma 3 images on the llama.cpp engine: a tiny random Gemma 3 (a sliding window of 16 tokens)
with a `gemma3` projector, built at test time (tests/fixtures/tiny_gemma3_vlm_gguf.py). mtmd wraps
each image in `<start_of_image>`/`<end_of_image>` and decodes it with causal attention off, in
one ubatch. The reference of correctness is mtmd's own evaluation of the same prompt on a plain
single-sequence context (`mtmd_helper_eval_chunks`, as llama-mtmd-cli runs it): our batched
engine, cold or reusing a slot's KV, answers what it answers, greedy."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from backends.base import IMAGE_MARKER
from backends.llamacpp.backend import LlamaCppBackend
from backends.llamacpp.vision import image_id, image_spans
from kernel.config import TierSettings
from kernel.errors import InvalidRequestError
from tests.batching import batched
from tests.fixtures.mtmd_reference import Answer, Reference, ask, expected, image, load_vlm, run, scored, scored_run
from tests.fixtures.tiny_gemma3_vlm_gguf import BEGIN, END, IMAGE_TOKENS, WINDOW, build_tiny_gemma3_vlm_gguf
from tests.fixtures.tiny_vlm_gguf import require_mtmd

require_mtmd()

# Enough text after the image that the sliding window has moved past it when the answer starts.
LONG = "tell me more about this picture, its colours and its shapes, and what it shows"
RED, BLUE = image(1), image(2)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_gemma3_vlm_gguf(tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def vlm(files: tuple[Path, Path]) -> Iterator[LlamaCppBackend]:
    backend = load_vlm(files[0], max_batch=3)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference(files: tuple[Path, Path]) -> Iterator[Reference]:
    ref = Reference(*files)
    yield ref
    ref.close()


def test_mtmd_wraps_the_image_and_counts_its_places(vlm: LlamaCppBackend) -> None:
    assert vlm.reads_images
    prompt = vlm.tokens(ask(RED))
    start = prompt.index(image_id(RED.digest))
    begin, end = vlm.encode(BEGIN)[-1], vlm.encode(END)[-1]  # single control tokens
    assert prompt[start - 1] == begin
    assert prompt[start : start + IMAGE_TOKENS] == [image_id(RED.digest)] * IMAGE_TOKENS
    assert prompt[start + IMAGE_TOKENS] == end
    _, last = run(vlm, ask(RED))
    assert last.usage is not None and last.usage.prompt_tokens == len(prompt)


def test_two_images_two_answers_as_mtmd_gives_them(vlm: LlamaCppBackend, reference: Reference) -> None:
    answers = []
    for im in (RED, BLUE):
        vlm.reset_prefix_cache()
        answer = scored(vlm, ask(im))
        assert answer == expected(vlm, reference, ask(im))
        answers.append(answer)
    assert answers[0].text != answers[1].text
    # The comparison sees how the image was read: mtmd splitting it over decodes (each part attending
    # only to the parts before it, as a causal model reads) scores otherwise.
    assert expected(vlm, reference, ask(RED), n_batch=IMAGE_TOKENS // 2) != answers[0]


def test_an_image_past_the_sliding_window(vlm: LlamaCppBackend, reference: Reference) -> None:
    request = ask(RED, text=LONG)
    prompt = vlm.tokens(request)
    after = len(prompt) - prompt.index(image_id(RED.digest)) - IMAGE_TOKENS
    assert after > WINDOW  # the sliding layer no longer sees the image; the global one does
    vlm.reset_prefix_cache()
    cold = scored(vlm, request)
    assert cold == expected(vlm, reference, request)
    assert cold != scored(vlm, ask(BLUE, text=LONG))


def test_a_second_turn_reuses_the_image_and_answers_as_a_cold_slot(vlm: LlamaCppBackend, reference: Reference) -> None:
    for text in ("what is it", LONG):  # the image inside the window, then past it
        vlm.reset_prefix_cache()
        first, _ = run(vlm, ask(BLUE, text=text))
        history = ({"role": "user", "content": f"{IMAGE_MARKER} {text}"}, {"role": "assistant", "content": first})
        turn = replace(ask(text="and now", history=history), images=(BLUE,))
        warm, warm_end = scored_run(vlm, turn)
        start = vlm.tokens(turn).index(image_id(BLUE.digest))
        # The window's checkpoint lies after the image: its KV is reused, not encoded again.
        assert warm_end.usage is not None and warm_end.usage.cached_tokens >= start + IMAGE_TOKENS
        vlm.reset_prefix_cache()
        cold, cold_end = scored_run(vlm, turn)
        assert cold_end.usage is not None and cold_end.usage.cached_tokens == 0
        assert warm == cold == expected(vlm, reference, turn)


def test_a_slot_is_never_cut_back_inside_an_image(vlm: LlamaCppBackend, reference: Reference) -> None:
    """Past the window a sliding layer cannot be cut back to any position: the slot goes back to a
    checkpoint or to nothing, never into the image; what it answers next is still mtmd's answer."""
    slots = vlm.kv_slots
    vlm.reset_prefix_cache()
    run(vlm, ask(RED, text=LONG))
    slot = max(slots.slots, key=lambda s: len(s.tokens))
    start = slot.tokens.index(image_id(RED.digest))
    slot.busy = True
    try:
        kept = slots._keep(slot, start + IMAGE_TOKENS // 2)
        assert kept <= start
        assert len(slot.tokens) == kept
    finally:
        slots.release(slot)
    # The same image with other text after it: reuses what is left, answers as mtmd does.
    request = ask(RED, text="and what colour")
    assert scored(vlm, request) == expected(vlm, reference, request)


def test_images_batch_with_text(vlm: LlamaCppBackend) -> None:
    text = ask(text="hello there, what is new")
    requests = [ask(RED), ask(BLUE, text=LONG), text]
    alone = []
    for request in requests:
        vlm.reset_prefix_cache()
        alone.append(run(vlm, request)[0])
    vlm.reset_prefix_cache()
    together = ["".join(t.text for t in tokens) for tokens in batched(vlm, requests)]
    assert together == alone


def test_an_image_larger_than_n_batch_is_refused(files: tuple[Path, Path]) -> None:
    """Gemma 3 reads an image in one ubatch (its tokens attend both ways): one that does not fit
    is a 400 naming N_BATCH, not a split image."""
    model, _ = files
    small = TierSettings(name="light", model_path=str(model), n_ctx=256, n_batch=IMAGE_TOKENS - 1)
    backend = LlamaCppBackend(small, str(model))
    backend.load()
    try:
        with pytest.raises(InvalidRequestError, match="N_BATCH"):
            backend.tokens(ask(RED))
    finally:
        backend.close()


def test_two_images_in_one_prompt_as_mtmd_reads_them(vlm: LlamaCppBackend, reference: Reference) -> None:
    vlm.reset_prefix_cache()
    request = ask(RED, BLUE, text=LONG)
    assert vlm.tokens(request).count(image_id(BLUE.digest)) == IMAGE_TOKENS
    assert scored(vlm, request) == expected(vlm, reference, request)


def test_sequences_sharing_an_image_in_one_batch(vlm: LlamaCppBackend, reference: Reference) -> None:
    """Two prompts with the same image join one batch: the second waits while the first prefills
    the shared prefix, which stops there (further on, the sliding window would have left the start
    of what the second needs), and takes its KV, image included, instead of encoding it again."""
    for second in ("and what colour", LONG + " again"):
        requests = [replace(ask(RED, text=LONG), logprobs=True), replace(ask(RED, text=second), logprobs=True)]
        leader, follower = batched(vlm, requests)
        start = vlm.tokens(requests[0]).index(image_id(RED.digest))
        assert follower[0].cached_tokens > start + IMAGE_TOKENS
        together = []
        for tokens in (leader, follower):
            first = tokens[0].logprob
            assert first is not None
            together.append(Answer("".join(t.text for t in tokens), first.logprob))
        assert together == [expected(vlm, reference, r) for r in requests]


def test_image_spans_name_each_image() -> None:
    """/tokenize's `images`: each run of places matched to the request's image it shows, in order;
    a tiled image's runs (its id again, no other image between) keep its index."""
    x, y = image_id(RED.digest), image_id(BLUE.digest)
    spans = image_spans([1, x, x, 2, y, y, y, 3, x, x, 4], (RED, BLUE, RED))
    assert [(s.index, s.start, s.length) for s in spans] == [(0, 1, 2), (1, 4, 3), (2, 8, 2)]
    tiles = image_spans([x, x, 4, x, x, 5, y], (RED, BLUE))
    assert [s.index for s in tiles] == [0, 0, 1]
    assert [s.index for s in image_spans([1, y, 2], (RED,))] == [None]
