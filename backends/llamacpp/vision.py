"""Images for the llama.cpp engine, through llama.cpp's mtmd library and a projector GGUF.

A prompt with images is tokenized by mtmd into text and image chunks (`VisionPrompt`). In the
prompt's token list an image takes one place per embedding it decodes into the KV, each holding
the same negative id derived from the image's digest: a slot that keeps an image's KV then
matches the next prompt with the same image like any other prefix (llama-server keys image
chunks by their hash too), and a different image stops the match where it starts. The batch
evaluates an image whole when a sequence's prefill reaches it (`Vision.evaluate`): encoded by the
projector, its embeddings decoded into the sequence's KV; a prefix is never cut inside one
(`image_start`).

On M-RoPE models (Qwen2-VL and later) an image's embeddings take fewer positions than places
(`mtmd_input_chunk_get_n_pos`: max(nx, ny) of its nx x ny grid), and the text after it goes on
from the position after the image: a slot maps a place to its position (`KvSlot.position`).
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections.abc import Sequence
from typing import Any

import llama_cpp

from backends.base import IMAGE_MARKER, ImageInput, ImageSpan
from kernel.errors import EngineError, InvalidRequestError, ModelUnavailableError

log = logging.getLogger(__name__)

_ID_SPAN = 2**31 - 3  # image ids lie in -2 .. -(2**31 - 2): never a token, never LLAMA_TOKEN_NULL (-1)


def image_id(digest: str) -> int:
    """The id each place of an image holds in a prompt's token list."""
    return -2 - int(digest[:16], 16) % _ID_SPAN


def image_spans(prompt: Sequence[int], images: Sequence[ImageInput]) -> list[ImageSpan]:
    """The runs of image places in `prompt`, each matched to the first image after the previous
    run's that it shows (a tiled image's runs repeat its id)."""
    ids = [image_id(im.digest) for im in images]
    starts = prompt.images if isinstance(prompt, VisionPrompt) else {}
    spans: list[ImageSpan] = []
    k, i = -1, 0
    while i < len(prompt):
        place = prompt[i]
        if place >= 0:
            i += 1
            continue
        j = i + 1
        while j < len(prompt) and prompt[j] == place and j not in starts:  # the same image twice in a row
            j += 1
        if k + 1 < len(ids) and ids[k + 1] == place:
            k += 1
        spans.append(ImageSpan(k if k >= 0 and ids[k] == place else None, i, j - i))
        i = j
    return spans


def image_start(tokens: Sequence[int], n: int) -> int:
    """`n`, moved back to where the image it falls inside starts: an image's KV is whole or absent."""
    while 0 < n < len(tokens) and tokens[n] < 0 and tokens[n - 1] == tokens[n]:
        n -= 1
    return n


class VisionPrompt(list[int]):
    """A prompt's token list with its images: `images[i]` is the mtmd chunk of the image whose first
    place is index `i`. The chunks are freed with the prompt."""

    images: dict[int, Any]

    def __init__(self, tokens: list[int], images: dict[int, Any], chunks: Any) -> None:
        super().__init__(tokens)
        self.images = images
        weakref.finalize(self, _mtmd().mtmd_input_chunks_free, chunks)


class Vision:
    """A projector loaded beside a model (`mtmd_init_from_file`); `close` frees it."""

    def __init__(self, model: Any, path: str, n_threads: int, use_gpu: bool, ubatch: int, where: str) -> None:
        mtmd = _mtmd()
        self._ubatch = ubatch  # the context's n_ubatch: an image attended both ways must fit in one
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.media_marker = IMAGE_MARKER.encode()
        self._ctx = mtmd.mtmd_init_from_file(path.encode("utf-8"), model, params)
        if not self._ctx:
            raise ModelUnavailableError(f"{where}: llama.cpp could not load the projector {path} (see the log above)")
        self.path = path
        if not mtmd.mtmd_support_vision(self._ctx):
            self.close()
            raise ModelUnavailableError(f"{where}: the projector {path} reads no images (audio only)")

    def close(self) -> None:
        if self._ctx:
            _mtmd().mtmd_free(self._ctx)
            self._ctx = None

    def tokenize(self, text: str, images: Sequence[ImageInput], add_special: bool) -> VisionPrompt:
        """Split `text` at its image markers into text tokens and image places (see the module doc)."""
        mtmd = _mtmd()
        bitmaps = [_bitmap(mtmd, image) for image in images]
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            data = text.encode("utf-8")
            source = mtmd.mtmd_input_text(data, len(data), add_special, True)
            array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(source), array, len(bitmaps))
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
        if rc != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise InvalidRequestError(
                f"messages: llama.cpp could not read the images (mtmd_tokenize status {rc}: 1 when images and"
                " markers differ in number, 2 when an image could not be preprocessed)",
                param="messages",
            )
        tokens: list[int] = []
        places: dict[int, Any] = {}
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            kind = mtmd.mtmd_input_chunk_get_type(chunk)
            if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t(0)
                ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                tokens.extend(ids[: count.value])
            elif kind == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                # The chunk carries its bitmap's id, the image's digest (a tiled image has several chunks).
                digest = (mtmd.mtmd_input_chunk_get_id(chunk) or b"0").decode()
                n = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
                if n > self._ubatch and mtmd.mtmd_decode_use_non_causal(self._ctx, chunk):
                    mtmd.mtmd_input_chunks_free(chunks)
                    raise InvalidRequestError(
                        f"messages: an image takes {n} tokens, and this model reads an image in one piece of"
                        f" at most {self._ubatch} (the tier's N_BATCH, up to 512)",
                        param="messages",
                    )
                places[len(tokens)] = chunk
                tokens.extend([image_id(digest)] * n)
            else:
                mtmd.mtmd_input_chunks_free(chunks)
                raise InvalidRequestError("messages: only images are read here", param="messages")
        return VisionPrompt(tokens, places, chunks)

    def evaluate(self, context: Any, chunk: Any, position: int, seq: int, n_batch: int) -> int:
        """Encode an image chunk and decode its embeddings into sequence `seq` from `position`;
        returns the position after it (on an M-RoPE model, fewer than its places after `position`)."""
        mtmd = _mtmd()
        after = llama_cpp.llama_pos(0)
        rc = mtmd.mtmd_helper_eval_chunk_single(
            self._ctx, context, chunk, position, seq, n_batch, False, ctypes.byref(after)
        )
        if rc != 0:
            raise EngineError(f"llama.cpp could not evaluate an image (status {rc})")
        return int(after.value)


def image_places(chunk: Any) -> int:
    """The places (embeddings) an image chunk takes in a prompt's token list."""
    return int(_mtmd().mtmd_input_chunk_get_n_tokens(chunk))


def _bitmap(mtmd: Any, image: ImageInput) -> Any:
    # mtmd copies the pixels: it reads them straight from the bytes object, with no copy of ours first.
    pixels = ctypes.cast(ctypes.c_char_p(image.rgb), ctypes.POINTER(ctypes.c_uint8))
    bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, pixels)
    if not bitmap:
        raise InvalidRequestError("messages: llama.cpp could not take an image", param="messages")
    mtmd.mtmd_bitmap_set_id(bitmap, image.digest.encode())
    return bitmap


def _mtmd() -> Any:
    """llama-cpp-python's mtmd bindings: importing them loads libmtmd, which a build without
    LLAVA_BUILD lacks (the error says so)."""
    import llama_cpp.mtmd_cpp as mtmd

    return mtmd


def load_vision(model: Any, path: str, n_threads: int, use_gpu: bool, ubatch: int, where: str) -> Vision | None:
    """The projector, or None (logged) where this llama-cpp-python was built without mtmd."""
    try:
        mtmd = _mtmd()
    except (ImportError, OSError, FileNotFoundError, RuntimeError) as exc:
        log.warning(
            "%s: this llama-cpp-python has no mtmd library (%s): images get a 400. Reinstall it built with"
            " CMAKE_ARGS=-DLLAVA_BUILD=ON (start_service.sh does)",
            where,
            exc,
        )
        return None
    from llama_cpp import _logger  # llama.cpp's log callback, filtered by its logger's level

    mtmd.mtmd_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    return Vision(model, path, n_threads, use_gpu, ubatch, where)
