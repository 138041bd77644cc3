"""Images in requests, on every API: where each one is (`ImagePart`), whether the tier can take it,
and the bytes fetched, checked and decoded into the neutral `ImageInput` an engine reads.

A data URL is decoded in place; an http(s) URL is fetched only with ALLOW_REMOTE_IMAGES (a server
that fetches whatever URL a page hands it is an SSRF hole), bounded in bytes, time and redirects.
Decoding runs off the event loop, bounded in encoded bytes and in pixels before any pixel is
decoded, so a decompression bomb is a 400 and never a process out of memory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import warnings
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


async def load_images(parts: list[ImagePart], settings: Settings) -> tuple[ImageInput, ...]:
    """Every image of a request, in order, decoded; the first bad one is a 400 naming it."""
    return tuple([await _load(part, settings) for part in parts])


async def _load(part: ImagePart, settings: Settings) -> ImageInput:
    if part.url.startswith("data:"):
        data = _data_url(part, settings.max_image_bytes)
    elif part.url.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise InvalidRequestError(
                f"{part.param}: image URLs are not fetched by this server (ALLOW_REMOTE_IMAGES is off); "
                "send the image as a data URL (base64)",
                param=part.param,
            )
        data = await _fetch(part, settings.max_image_bytes)
    else:
        raise InvalidRequestError(f"{part.param}: an image must be a data URL or an http(s) URL", param=part.param)
    return await asyncio.to_thread(_decode, data, part.param, settings.max_image_pixels)


def _data_url(part: ImagePart, max_bytes: int) -> bytes:
    header, comma, payload = part.url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise InvalidRequestError(
            f"{part.param}: a data URL must be base64 (data:image/png;base64,...)", param=part.param
        )
    if len(payload) * 3 // 4 > max_bytes:
        raise InvalidRequestError(f"{part.param}: the image is larger than {max_bytes} bytes", param=part.param)
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


def _decode(data: bytes, param: str, max_pixels: int) -> ImageInput:
    """Pillow reads the header first: the size is checked before a pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise InvalidRequestError(
                    f"{param}: the image is {image.width}x{image.height}, above the {max_pixels} pixels "
                    "this server decodes (MAX_IMAGE_PIXELS)",
                    param=param,
                )
            rgb = image.convert("RGB")
    except InvalidRequestError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequestError(f"{param}: not an image this server can read ({exc})", param=param) from None
    pixels = rgb.tobytes()
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + pixels).hexdigest()
    return ImageInput(rgb.width, rgb.height, pixels, digest)
