"""Images on an M-RoPE model (Qwen2-VL and later) on the llama.cpp engine: a tiny random Qwen2-VL
built at test time (tests/fixtures/tiny_qwen_vlm_gguf.py). An image there takes fewer positions
than places (embeddings) in the prompt, so the text after it sits at positions below its index:
the answers must match llama.cpp's own evaluation of the prompt (mtmd_helper_eval_chunks), from
a cold slot, a reused image prefix, a batch and a restored prompt-cache entry alike."""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

import llama_cpp

from backends.base import IMAGE_MARKER, GenerationRequest, ImageInput, template_variables
from backends.llamacpp.backend import LlamaCppBackend
from backends.llamacpp.vision import image_id
from tests.batching import batched
from tests.fixtures.mtmd_reference import MAX_TOKENS, ask, load_vlm
from tests.fixtures.mtmd_reference import image as reference_image
from tests.fixtures.tiny_qwen_vlm_gguf import build_tiny_qwen_vlm_gguf, image_grid
from tests.fixtures.tiny_vlm_gguf import require_mtmd

require_mtmd()

import llama_cpp.mtmd_cpp as mtmd  # noqa: E402 - after the check that names the missing library

WIDTH, HEIGHT = 96, 64  # 6 x 4 merged patches: 24 places on 6 positions
NX, NY = image_grid(WIDTH, HEIGHT)
PLACES = NX * NY


def image(seed: int) -> ImageInput:
    return reference_image(seed, WIDTH, HEIGHT)


RED, BLUE = image(1), image(2)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_qwen_vlm_gguf(tmp_path_factory.mktemp("qwen-vlm"))


def loaded(model: Path, **settings: object) -> LlamaCppBackend:
    return load_vlm(model, **{"max_batch": 3, **settings})


@pytest.fixture(scope="module")
def vlm(files: tuple[Path, Path]) -> Iterator[LlamaCppBackend]:
    backend = loaded(files[0])  # the projector is found beside the model (mmproj*.gguf)
    yield backend
    backend.close()


def answer(backend: LlamaCppBackend, request: GenerationRequest) -> tuple[list[bytes], int, int]:
    """The greedy answer's token pieces, prompt tokens and cached tokens."""
    request = dataclasses.replace(request, logprobs=True, top_logprobs=0)
    chunks = list(backend.stream(request))
    usage = chunks[-1].usage
    assert usage is not None
    pieces = [t.logprob.raw for c in chunks for t in c.scored if t.logprob is not None]
    return pieces, usage.prompt_tokens, usage.cached_tokens


def reference(
    files: tuple[Path, Path], backend: LlamaCppBackend, request: GenerationRequest, max_tokens: int = MAX_TOKENS
) -> list[bytes]:
    """The same prompt evaluated by llama.cpp's own single-sequence path: mtmd tokenizes it and
    `mtmd_helper_eval_chunks` decodes text and images at the positions it assigns; then greedy
    decoding from the position it returns."""
    model_path, projector = files
    assert request.messages is not None
    text = backend.render_chat(request.messages, request.tools, template_variables(request)).encode()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 512, 64, 64
    ctx = llama_cpp.llama_init_from_model(model, cp)
    mparams = mtmd.mtmd_context_params_default()
    mparams.use_gpu, mparams.print_timings = False, False
    mparams.media_marker = IMAGE_MARKER.encode()
    mctx = mtmd.mtmd_init_from_file(str(projector).encode(), model, mparams)
    chunks = mtmd.mtmd_input_chunks_init()
    batch = llama_cpp.llama_batch_init(1, 0, 1)
    try:
        bitmaps = []
        for im in request.images:
            pixels = (ctypes.c_uint8 * len(im.rgb)).from_buffer_copy(im.rgb)
            bitmaps.append(mtmd.mtmd_bitmap_init(im.width, im.height, pixels))
        source = mtmd.mtmd_input_text(text, len(text), False, True)  # (the template writes <s>)
        array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
        assert mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(source), array, len(bitmaps)) == 0
        for bitmap in bitmaps:
            mtmd.mtmd_bitmap_free(bitmap)
        assert mtmd.mtmd_helper_get_n_tokens(chunks) == len(backend.tokens(request))
        n_past = llama_cpp.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, 64, True, ctypes.byref(n_past)) == 0
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        pos, pieces = int(n_past.value), []
        # The text after the images sits below its index in the prompt: what the engine must match.
        assert pos < mtmd.mtmd_helper_get_n_tokens(chunks)
        for _ in range(max_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            token = int(np.argmax(logits))
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
            pieces.append(buf.raw[:n])
            batch.n_tokens = 1
            batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = token, pos, 1, True
            batch.seq_id[0][0] = 0
            assert llama_cpp.llama_decode(ctx, batch) == 0
            pos += 1
        return pieces
    finally:
        llama_cpp.llama_batch_free(batch)
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_free(mctx)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def test_the_image_changes_the_answer_and_its_places_count(vlm: LlamaCppBackend) -> None:
    assert vlm.reads_images
    vlm.reset_prefix_cache()
    red, red_prompt, _ = answer(vlm, ask(RED))
    blue, _, _ = answer(vlm, ask(BLUE))
    assert red != blue
    prompt = vlm.tokens(ask(RED))
    assert prompt.count(image_id(RED.digest)) == PLACES  # every embedding, as llama-server counts them
    assert red_prompt == len(prompt)


def test_answers_match_llama_cpps_own_evaluation(vlm: LlamaCppBackend, files: tuple[Path, Path]) -> None:
    for request in (ask(RED), ask(BLUE, RED, text="and these")):
        vlm.reset_prefix_cache()
        assert answer(vlm, request)[0] == reference(files, vlm, request)


def test_a_later_turn_reuses_the_image_kv_at_its_positions(vlm: LlamaCppBackend, files: tuple[Path, Path]) -> None:
    vlm.reset_prefix_cache()
    first, _, _ = answer(vlm, ask(RED))
    history = (
        {"role": "user", "content": f"{IMAGE_MARKER} what is it"},
        {"role": "assistant", "content": b"".join(first).decode("utf-8", errors="replace")},
    )
    turn = GenerationRequest(
        messages=(*history, {"role": "user", "content": "and now"}),
        images=(RED,),
        max_tokens=MAX_TOKENS,
        temperature=0.0,
    )
    warm, _, cached = answer(vlm, turn)
    start = vlm.tokens(turn).index(image_id(RED.digest))
    assert cached >= start + PLACES
    vlm.reset_prefix_cache()
    cold, _, cached = answer(vlm, turn)
    assert cached == 0
    assert warm == cold == reference(files, vlm, turn)
    # A slot cut back into its image keeps what comes before it, and goes on at the right position.
    slots = vlm.kv_slots
    slot = max(slots.slots, key=lambda s: len(s.tokens))
    assert slot.shifts == [(start + PLACES, PLACES - max(NX, NY))]
    slot.busy = True
    try:
        assert slots._keep(slot, start + PLACES // 2) == start
        assert slot.shifts == []
    finally:
        slots.release(slot)
    assert answer(vlm, turn)[0] == cold


def test_images_batch_with_each_other_and_with_text(vlm: LlamaCppBackend, files: tuple[Path, Path]) -> None:
    text = GenerationRequest(messages=({"role": "user", "content": "hello there"},), max_tokens=MAX_TOKENS)
    requests = [ask(RED), ask(BLUE, text="and this"), dataclasses.replace(text, temperature=0.0)]
    vlm.reset_prefix_cache()
    expected = [reference(files, vlm, requests[0]), reference(files, vlm, requests[1]), answer(vlm, requests[2])[0]]
    scored = [dataclasses.replace(r, logprobs=True) for r in requests]
    together = [[t.logprob.raw for t in tokens if t.logprob is not None] for tokens in batched(vlm, scored)]
    assert together == expected


def test_a_restored_prompt_cache_entry_keeps_the_image_positions(files: tuple[Path, Path], tmp_path: Path) -> None:
    backend = loaded(files[0], max_batch=1, prompt_cache_ram_bytes=2**28)
    try:
        first, _, _ = answer(backend, ask(RED))
        other = "tell me a long story about the sea and the wind and the boats, " * 3
        answer(backend, GenerationRequest(messages=({"role": "user", "content": other},), max_tokens=2))
        history = (
            {"role": "user", "content": f"{IMAGE_MARKER} what is it"},
            {"role": "assistant", "content": b"".join(first).decode("utf-8", errors="replace")},
        )
        turn = GenerationRequest(
            messages=(*history, {"role": "user", "content": "and now"}),
            images=(RED,),
            max_tokens=MAX_TOKENS,
            temperature=0.0,
        )
        warm, _, cached = answer(backend, turn)
        stats = backend.prompt_cache_stats()
        assert stats is not None and stats["ram"]["hits"] == 1
        assert cached > backend.tokens(turn).index(image_id(RED.digest)) + PLACES
        assert warm == reference(files, backend, turn)
    finally:
        backend.close()


def test_ngram_drafts_after_an_image_go_at_its_positions(files: tuple[Path, Path]) -> None:
    backend = loaded(files[0], speculative="ngram", max_batch=1)
    try:
        # A prompt whose text repeats, for the n-gram lookup to draft from, after two images.
        request = ask(RED, BLUE, text="abc abc abc abc abc abc abc abc")
        request = dataclasses.replace(request, max_tokens=24)
        pieces, _, _ = answer(backend, request)
        stats = backend.speculative_stats()
        assert stats is not None and stats["drafted"] > 0
        assert pieces == reference(files, backend, request, max_tokens=24)
    finally:
        backend.close()
