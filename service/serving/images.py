"""Images in requests, on every API: where each one is (`ImagePart`), whether the tier can take it,
and the bytes fetched, checked and decoded into the neutral `ImageInput` an engine reads.

A data URL is decoded in place; an http(s) URL is fetched only with ALLOW_REMOTE_IMAGES (a server
that fetches whatever URL a page hands it is an SSRF hole), bounded in bytes, time and redirects.
Decoding runs off the event loop, bounded in encoded bytes and in pixels before any pixel is
decoded, so a decompression bomb is a 400 and never a process out of memory. An image's digest is
the sha256 of its file (the engines' prefix-cache key); `ImageLoader` keeps recently decoded images
by it, so an image sent again is neither decoded nor hashed pixel by pixel.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

from backends.base import IMAGE_MARKER, ImageInput
from kernel.config import TierSettings
from kernel.errors import InvalidRequestError
from service.settings import Settings

REMOTE_TIMEOUT_SECONDS = 10.0
REMOTE_MAX_REDIRECTS = 3
IMAGE_CACHE_SECONDS = 300.0  # how long a decoded image is kept for the next request that sends it
# Sources up to this size (base64 text or bytes) are hashed on the event loop (~1 ms at most), so an image
# decoded before costs no thread hop; larger ones are decoded from base64 and hashed off the loop.
INLINE_SOURCE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class ImagePart:
    """One image a request carries: a data URL or an http(s) URL (or base64 with its media type),
    and where it was (`param`, for the 400 that names it)."""

    url: str
    param: str


def check_images(messages: Sequence[dict[str, Any]], parts: list[ImagePart], tier: TierSettings) -> None:
    """A text-only tier answers an image with a 400 naming the part and the tier, never a reply that
    never saw it. On a tier that reads images, a text that spells the marker itself would pass for
    an image that was never sent: a 400 too."""
    if parts and not tier.reads_images:
        model = tier.model_name or tier.model_path or tier.name
        raise InvalidRequestError(
            f"{parts[0].param} is an image, and tier {tier.name} ({model}) reads text only "
            f"(a llama.cpp tier takes images with its projector: {tier.name.upper()}_MMPROJ_PATH; "
            "an MLX tier with a vision-language model folder)",
            param=parts[0].param,
        )
    if tier.reads_images:
        markers = sum(str(m.get("content") or "").count(IMAGE_MARKER) for m in messages)
        if markers != len(parts):
            raise InvalidRequestError(
                f"messages: the text contains {IMAGE_MARKER!r}, which marks an image on this model", param="messages"
            )


class ImageLoader:
    """Reads a request's images into `ImageInput`s, keeping the recently decoded ones by digest (the
    sha256 of the image file) for `IMAGE_CACHE_SECONDS`, within IMAGE_CACHE_BYTES of pixels: a client
    that sends the same screenshot every turn (an agent does) pays no decode after the first. Small
    images that were decoded before are read on the loop; the rest in one thread hop per request."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._cache = _DecodedImages(settings.image_cache_bytes, IMAGE_CACHE_SECONDS)

    async def load(self, parts: Sequence[ImagePart]) -> tuple[ImageInput, ...]:
        """Every image of a request, in order, decoded; the first bad one is a 400 naming it."""
        if not parts:
            return ()
        sources = [await self._source(part) for part in parts]
        if sum(len(source) for source in sources) > INLINE_SOURCE_BYTES:  # its base64 too, off the loop
            return await asyncio.to_thread(lambda: self._decode(parts, self._lookup(parts, sources)))
        found = self._lookup(parts, sources)
        images = [item for item in found if isinstance(item, ImageInput)]
        if len(images) == len(found):  # all decoded before: no thread hop
            return tuple(images)
        return await asyncio.to_thread(self._decode, parts, found)

    async def _source(self, part: ImagePart) -> str | bytes:
        """A data URL's base64 text, checked for shape and size, or a fetched image's bytes."""
        settings = self._settings
        if part.url.startswith("data:"):
            return _data_url(part, settings.max_image_bytes)
        if part.url.startswith(("http://", "https://")):
            if not settings.allow_remote_images:
                raise InvalidRequestError(
                    f"{part.param}: image URLs are not fetched by this server (ALLOW_REMOTE_IMAGES is off); "
                    "send the image as a data URL (base64)",
                    param=part.param,
                )
            return await _fetch(part, settings.max_image_bytes)
        raise InvalidRequestError(f"{part.param}: an image must be a data URL or an http(s) URL", param=part.param)

    def _lookup(self, parts: Sequence[ImagePart], sources: list[str | bytes]) -> list[ImageInput | _File]:
        """Each source as its cached image, or as the file still to decode."""
        found: list[ImageInput | _File] = []
        for part, source in zip(parts, sources, strict=True):
            data = _base64(part, source) if isinstance(source, str) else source
            digest = hashlib.sha256(data).hexdigest()
            found.append(self._cache.get(digest) or _File(data, digest))
        return found

    def _decode(self, parts: Sequence[ImagePart], found: list[ImageInput | _File]) -> tuple[ImageInput, ...]:
        out: list[ImageInput] = []
        for part, item in zip(parts, found, strict=True):
            if isinstance(item, _File):  # (the same image twice in a request: decoded once)
                cached = self._cache.get(item.digest)
                item = cached or _decode(item, part.param, self._settings.max_image_pixels)
                if cached is None:
                    self._cache.put(item)
            out.append(item)
        return tuple(out)


@dataclass(frozen=True, slots=True)
class _File:
    data: bytes
    digest: str


class _DecodedImages:
    """Decoded images by digest, least recently used first, each kept `ttl` seconds after it was last
    sent; the loop and the decoding threads share it (a lock, held for a dict operation)."""

    def __init__(self, max_bytes: int, ttl: float) -> None:
        self._max_bytes = max_bytes
        self._ttl = ttl
        self._entries: OrderedDict[str, tuple[ImageInput, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, digest: str) -> ImageInput | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            now = time.monotonic()
            if entry[1] < now:
                self._drop(digest)
                return None
            self._entries[digest] = (entry[0], now + self._ttl)  # kept while it is sent again
            self._entries.move_to_end(digest)
            return entry[0]

    def put(self, image: ImageInput) -> None:
        size = len(image.rgb)
        if size > self._max_bytes:
            return
        with self._lock:
            if image.digest in self._entries:
                self._drop(image.digest)
            now = time.monotonic()
            while self._entries and (
                self._bytes + size > self._max_bytes or next(iter(self._entries.values()))[1] < now
            ):
                self._drop(next(iter(self._entries)))
            self._entries[image.digest] = (image, now + self._ttl)
            self._bytes += size

    def _drop(self, digest: str) -> None:
        image, _ = self._entries.pop(digest)
        self._bytes -= len(image.rgb)


def _data_url(part: ImagePart, max_bytes: int) -> str:
    header, comma, payload = part.url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise InvalidRequestError(
            f"{part.param}: a data URL must be base64 (data:image/png;base64,...)", param=part.param
        )
    if len(payload) * 3 // 4 > max_bytes:
        raise InvalidRequestError(f"{part.param}: the image is larger than {max_bytes} bytes", param=part.param)
    return payload


def _base64(part: ImagePart, payload: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{part.param}: the data URL is not valid base64", param=part.param) from None


async def _fetch(part: ImagePart, max_bytes: int) -> bytes:
    try:
        async with (
            httpx.AsyncClient(
                timeout=REMOTE_TIMEOUT_SECONDS, follow_redirects=True, max_redirects=REMOTE_MAX_REDIRECTS
            ) as client,
            client.stream("GET", part.url) as response,
        ):
            if response.status_code != 200:
                raise InvalidRequestError(
                    f"{part.param}: fetching the image answered HTTP {response.status_code}", param=part.param
                )
            body = bytearray()
            async for piece in response.aiter_bytes():
                body += piece
                if len(body) > max_bytes:
                    raise InvalidRequestError(
                        f"{part.param}: the image is larger than {max_bytes} bytes", param=part.param
                    )
            return bytes(body)
    except httpx.HTTPError as exc:
        raise InvalidRequestError(f"{part.param}: the image could not be fetched: {exc}", param=part.param) from None


def _decode(file: _File, param: str, max_pixels: int) -> ImageInput:
    """Pillow reads the header first: the size is checked before a pixel is decoded, and the pixels
    are decoded once, straight into RGB where the file is not RGB already."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(file.data))
            if image.width * image.height > max_pixels:
                raise InvalidRequestError(
                    f"{param}: the image is {image.width}x{image.height}, above the {max_pixels} pixels "
                    "this server decodes (MAX_IMAGE_PIXELS)",
                    param=param,
                )
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            pixels = rgb.tobytes()
    except InvalidRequestError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequestError(f"{param}: not an image this server can read ({exc})", param=param) from None
    return ImageInput(rgb.width, rgb.height, pixels, file.digest)
