"""Vision-language models on MLX through mlx-vlm: the model's processor turns images into pixels and
the prompt's image tokens, its vision tower and projector into embeddings at those tokens; the
language model then decodes like any mlx-lm model (the same batch, prefix cache and samplers).

The prefix cache keys a prompt by its tokens, and every image's tokens are the same placeholder id,
so each image position is keyed by the image's digest instead (`cache_key`): equal images share KV,
different ones never do.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, _BaseCache
from mlx_vlm.utils import load as vlm_load
from PIL import Image

from backends.base import IMAGE_MARKER, ImageInput, ImageSpan
from kernel.errors import InvalidRequestError


class TextModel(nn.Module):  # type: ignore[name-defined,misc]  # mlx.nn ships no types
    """An mlx-vlm language model with mlx-lm's calling convention (logits out, `input_embeddings`
    in), so `generate_step`, `BatchGenerator` and `make_prompt_cache` take it as they are.

    With `positions` (multimodal RoPE: Qwen2-VL, Qwen2.5-VL) each sequence's cache ends with a
    `RopeShift`, and every call gets explicit position ids: a text token's is its index plus its
    sequence's shift, on all three axes."""

    def __init__(self, language_model: Any, positions: bool = False) -> None:
        super().__init__()
        self.language_model = language_model
        self.positions = positions
        if hasattr(language_model, "make_cache") or positions:
            self.make_cache = self._make_cache

    def _make_cache(self) -> list[Any]:
        lm = self.language_model
        layers = lm.make_cache() if hasattr(lm, "make_cache") else [KVCache() for _ in lm.layers]  # type: ignore[no-untyped-call]
        return [*layers, RopeShift()] if self.positions else list(layers)

    @property
    def layers(self) -> list[Any]:
        return list(self.language_model.layers)

    def __call__(
        self,
        inputs: mx.array,
        cache: Any = None,
        input_embeddings: mx.array | None = None,
        position_ids: mx.array | None = None,
    ) -> mx.array:
        extra: dict[str, mx.array] = {}
        if self.positions and cache is not None:
            *cache, shift = cache
            if position_ids is None:
                rows, length = inputs.shape
                done = mx.array(cache[0].offset).reshape(-1, 1)  # a batch's is one per row
                at = done + mx.arange(length)[None, :] + shift.deltas[:, None]
                position_ids = mx.broadcast_to(at[None], (3, rows, length))
            extra["position_ids"] = position_ids
        out = self.language_model(inputs, inputs_embeds=input_embeddings, cache=cache, **extra)
        return out.logits  # type: ignore[no-any-return]


class RopeShift(_BaseCache):  # type: ignore[misc]  # mlx-lm ships no types
    """Per sequence, what multimodal RoPE adds to a text token's index to give its position: 0 until
    an image, then below 0 (an image's grid takes fewer positions than its tokens). The last entry of
    the cache list, so it travels with the sequence's KV: BatchGenerator's merge, filter, extend and
    extract, and the prefix cache (a trim leaves it; `prefill` and `text_only` set it from the prompt).
    Not a class the prompt cache tiers store: such sequences stay in RAM."""

    def __init__(self, deltas: mx.array | None = None) -> None:
        self.deltas = mx.zeros((1,), mx.int32) if deltas is None else deltas

    @property
    def state(self) -> list[mx.array]:
        return [self.deltas]

    @state.setter
    def state(self, v: list[mx.array]) -> None:
        (self.deltas,) = v

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        return n

    def empty(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return int(self.deltas.nbytes)

    @classmethod
    def merge(cls, caches: list[RopeShift]) -> RopeShift:
        return cls(mx.concatenate([c.deltas for c in caches]))

    def filter(self, batch_indices: Any) -> None:
        self.deltas = self.deltas[batch_indices]

    def extend(self, other: RopeShift) -> None:
        self.deltas = mx.concatenate([self.deltas, other.deltas])

    def extract(self, idx: int) -> RopeShift:
        return RopeShift(self.deltas[idx : idx + 1])

    def prepare(self, **kwargs: Any) -> None:
        pass

    def finalize(self) -> None:
        pass


class VisionLanguageModel:
    """A loaded mlx-vlm model: its processor, its vision side, and its language model as `text`."""

    def __init__(self, folder: Path) -> None:
        self._model, self._processor = vlm_load(str(folder))
        self.model_type = str(getattr(self._model.config, "model_type", "?"))
        # Qwen-VL-style positions come from the image grid: computed here per prompt (mlx-vlm keeps
        # them in the model between calls, which neither a prefix cache nor a batch could share).
        self.positions = hasattr(self._model.language_model, "get_rope_index")
        self.text = TextModel(self._model.language_model, self.positions)
        config = self._model.config
        self.image_token_id = int(getattr(config, "image_token_index", None) or config.image_token_id)
        self._image_token = self._processor.tokenizer.convert_ids_to_tokens(self.image_token_id)
        # What a prompt writes where an image goes, for the processor to expand into its tokens:
        # Gemma 3's processor expands `<start_of_image>`, LLaVA's the image token itself; Qwen-VL's
        # template wraps the image token in vision start/end tokens (its positions count from them).
        self._placeholder = str(getattr(self._processor, "boi_token", None) or self._image_token)
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))  # mlx-vlm's config drops the end's id
        start, end = (raw.get(f"vision_{side}_token_id") for side in ("start", "end"))
        if self.positions and start is not None and end is not None:
            convert = self._processor.tokenizer.convert_ids_to_tokens
            self._placeholder = f"{convert(int(start))}{self._image_token}{convert(int(end))}"
        # The processor's pixels from tokenizing a request (off the model's thread), by the images'
        # digests, so decoding does not resize and normalise the same images again.
        self._pixels: OrderedDict[tuple[str, ...], dict[str, mx.array]] = OrderedDict()
        self._lock = threading.Lock()

    def tokens(self, text: str, images: Sequence[ImageInput], bos: str | None) -> list[int]:
        """The prompt's tokens, each IMAGE_MARKER expanded into the image's tokens by the processor."""
        if text.count(IMAGE_MARKER) != len(images):
            raise InvalidRequestError("The prompt's image markers do not match its images.", param="messages")
        for n, im in enumerate(images):
            # Processors that scale the short side up to their size (CLIP's) would make a 1 x 16M
            # image billions of pixels: bounded here, before any resizing.
            if max(im.width, im.height) > MAX_ASPECT * min(im.width, im.height):
                raise InvalidRequestError(
                    f"Image {n + 1} is {im.width}x{im.height}: this model takes images at most {MAX_ASPECT}:1",
                    param="messages",
                )
        for mark in dict.fromkeys((self._placeholder, self._image_token)):
            if mark in text:  # the processor would expand it into an image that was never sent
                raise InvalidRequestError(
                    f"messages: the text contains {mark!r}, which marks an image on this model", param="messages"
                )
        out = self._processor(text=[text.replace(IMAGE_MARKER, self._placeholder)], images=_pil(images) or None)
        ids = [int(t) for t in np.asarray(out["input_ids"])[0]]
        pixels = {k: mx.array(np.asarray(v)) for k, v in out.items() if k not in _TEXT_KEYS}
        with self._lock:
            self._pixels[_digests(images)] = pixels
            while len(self._pixels) > _PIXELS_KEPT:
                self._pixels.popitem(last=False)
        bos_id = self._processor.tokenizer.bos_token_id
        if bos is not None and text.startswith(bos) and ids[:2] == [bos_id, bos_id]:
            ids = ids[1:]  # the template wrote BOS and the tokenizer added another
        return ids

    def _take_pixels(self, images: Sequence[ImageInput]) -> dict[str, mx.array]:
        """The processor's pixels (and image grids) for `images`: those kept from tokenizing, else anew."""
        with self._lock:
            pixels = self._pixels.pop(_digests(images), None)
        if pixels is None:
            out = self._processor.image_processor(images=_pil(images), return_tensors="np")
            pixels = {k: mx.array(np.asarray(v)) for k, v in out.items()}
        return pixels

    def embeddings(
        self, prompt: Sequence[int], images: Sequence[ImageInput], pixels: dict[str, mx.array] | None = None
    ) -> mx.array:
        """The language model's input embeddings for the whole prompt (length, hidden), the images'
        features at their tokens."""
        if pixels is None:
            pixels = self._take_pixels(images)
        ids = mx.array([list(prompt)])
        features = self._model.get_input_embeddings(ids, mask=mx.ones_like(ids), **pixels)
        # Anything beyond the embeddings (positions, cross-attention states) changes how the language
        # model must run. Gemma 3's `attention_mask_4d` does not: mlx-vlm's own generate hands it to a
        # language model that never reads it (causal attention throughout), and we match its answers.
        handled = _IGNORED | (_POSITIONS if self.positions else frozenset())
        extra = [f.name for f in fields(features) if f.name not in handled and getattr(features, f.name) is not None]
        if extra:
            raise InvalidRequestError(
                f"This {self.model_type} model reads images with {', '.join(extra)}, which the MLX engine "
                "does not apply yet; send text only",
                param="messages",
            )
        embeds: mx.array = features.inputs_embeds[0]
        return embeds

    def cache_key(self, prompt: Sequence[int], images: Sequence[ImageInput]) -> list[int]:
        """`prompt` with each image's tokens replaced by negative ids drawn from its digest (no token
        is negative), so the prefix cache tells images apart. Each run of image tokens is one image;
        where the runs do not match the images one to one, every image's digest keys every run."""
        key = list(prompt)
        runs = self._runs(prompt)
        every = "".join(im.digest for im in images)
        for n, run in enumerate(runs):
            digest = images[n].digest if len(runs) == len(images) else every
            for j, i in enumerate(run):
                # 31 bits: keys are stored as int32 (the prompt cache tiers' files)
                bits = int.from_bytes(hashlib.sha256(f"{digest}:{j}".encode()).digest()[:4], "little") & 0x7FFFFFFF
                key[i] = -1 - bits
        return key

    def _runs(self, prompt: Sequence[int]) -> list[list[int]]:
        """The indices of each run of image tokens in `prompt`."""
        runs: list[list[int]] = []
        for i, token in enumerate(prompt):
            if token == self.image_token_id:
                if runs and runs[-1][-1] == i - 1:
                    runs[-1].append(i)
                else:
                    runs.append([i])
        return runs

    def spans(self, prompt: Sequence[int], count: int) -> list[ImageSpan]:
        """Each run of image tokens, the n-th image's when runs and images match one to one."""
        runs = self._runs(prompt)
        return [ImageSpan(n if len(runs) == count else None, run[0], len(run)) for n, run in enumerate(runs)]

    def prefill(
        self, model: Any, prompt: Sequence[int], images: Sequence[ImageInput], cache: list[Any], start: int, step: int
    ) -> int:
        """Run the prompt from `start` through its last image token into `cache`, with the images'
        embeddings; return how many prompt tokens the cache now holds. The text after the images is
        left to the decoder (at least one token, which gives the first logits)."""
        last = max((i for i, t in enumerate(prompt) if t == self.image_token_id), default=-1)
        end = min(last + 1, len(prompt) - 1)
        if end <= start and not self.positions:
            return start
        pixels = self._take_pixels(images)
        positions = None
        if self.positions:
            # The whole prompt's positions (the cached part's are the same), and the shift of the
            # text after the last image, which the decoder goes on with.
            ids = mx.array([list(prompt)])
            positions, deltas = self._model.language_model.get_rope_index(ids, pixels.get("image_grid_thw"))
            cache[-1].deltas = mx.array(deltas).reshape(-1).astype(mx.int32)
        if end <= start:
            return start
        embeds = self.embeddings(prompt, images, pixels)
        for at in range(start, end, step):
            upto = min(at + step, end)
            where = None if positions is None else positions[:, :, at:upto]
            model(
                mx.array([list(prompt[at:upto])]),
                cache=cache,
                input_embeddings=embeds[None, at:upto],
                position_ids=where,
            )
            mx.eval([c.state for c in cache])
        return end

    def text_only(self, cache: list[Any] | None) -> None:
        """A text-only prompt's cache (from the prefix cache, maybe trimmed back from an image
        sequence's) has no shift: positions are indices until an image."""
        if self.positions and cache is not None:
            cache[-1].deltas = mx.zeros((1,), mx.int32)


MAX_ASPECT = 20  # longest side over shortest
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids"})
_IGNORED = frozenset({"inputs_embeds", "attention_mask_4d"})  # see `embeddings`
_POSITIONS = frozenset({"position_ids", "rope_deltas"})  # multimodal RoPE: `prefill` computes them per prompt
_PIXELS_KEPT = 16  # requests tokenized and not yet decoded (a full queue sees misses: it recomputes)


def _digests(images: Sequence[ImageInput]) -> tuple[str, ...]:
    return tuple(im.digest for im in images)


def _pil(images: Sequence[ImageInput]) -> list[Image.Image]:
    return [Image.frombytes("RGB", (im.width, im.height), im.rgb) for im in images]
