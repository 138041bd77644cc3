"""The image request path alone, in process: data URL -> `ImageInput` (base64, Pillow, digest) and
the engine's tokenization with it (mtmd bitmap + preprocessing), for a new image and for one sent
again, on a 64x64 PNG (bench_vision's) and a 1920x1080 screenshot-like PNG.

    python bench/bench_image_path.py [--baseline /work/main] [--rounds 5]

With `--baseline`, that checkout's service/serving/images.py (its `load_images`) is timed too,
alternating round by round with this one's; each figure is the best of the rounds' medians.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import io
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, ImageDraw

from backends.base import IMAGE_MARKER, GenerationRequest, ImageInput
from service.serving.images import ImageLoader, ImagePart
from service.settings import Settings


def small(seed: int) -> bytes:
    pixels = bytes((seed * 7919 + i * 104729) % 251 for i in range(64 * 64 * 3))
    return _png(Image.frombytes("RGB", (64, 64), pixels))


def screenshot(seed: int) -> bytes:
    """Flat panels and lines of text, as a screen looks: a PNG of ~130 KB."""
    image = Image.new("RGB", (1920, 1080), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    for y in range(0, 1080, 18):
        draw.text((10 + (y + seed) % 50, y), f"def function_{y}_{seed}(x): return x * {y}  # code on a screen", fill=0)
    draw.rectangle((1200, 100, 1800, 900), fill=(30, 60, 120 + seed % 100))
    return _png(image)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def url(data: bytes) -> list[ImagePart]:
    return [ImagePart("data:image/png;base64," + base64.b64encode(data).decode(), "messages[0].content[1]")]


Loader = Callable[[list[ImagePart]], Awaitable[tuple[ImageInput, ...]]]


def loaders(baseline: str | None) -> dict[str, Loader]:
    settings = Settings()
    out: dict[str, Loader] = {"this": ImageLoader(settings).load}
    if baseline:
        spec = importlib.util.spec_from_file_location("baseline_images", Path(baseline, "service/serving/images.py"))
        assert spec is not None and spec.loader is not None
        module: Any = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # (its dataclasses look their module up)
        spec.loader.exec_module(module)
        out["baseline"] = lambda parts: module.load_images(parts, settings)
    return out


async def median_ms(load: Loader, images: list[bytes], again: bool) -> float:
    times = []
    for data in images:
        parts = url(data)
        if again:
            await load(parts)
        start = time.perf_counter()
        await load(parts)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def tokenize_ms(images: list[ImageInput]) -> float:
    """mtmd's tokenization of a prompt with the image (bitmap, preprocessing), on the tiny VLM."""
    from backends.llamacpp.backend import LlamaCppBackend
    from kernel.config import TierSettings
    from tests.fixtures.tiny_vlm_gguf import build_tiny_vlm_gguf

    model, _ = build_tiny_vlm_gguf(Path("/tmp/bench-tiny-vlm"))
    backend = LlamaCppBackend(TierSettings(name="light", model_path=str(model), n_ctx=2048, n_threads=1), str(model))
    backend.load()
    try:
        times = []
        for image in images:
            messages = ({"role": "user", "content": f"{IMAGE_MARKER} what"},)
            request = GenerationRequest(messages=messages, images=(image,))
            start = time.perf_counter()
            backend.tokens(request)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000
    finally:
        backend.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args()
    sets = {"64x64 PNG": [small(i) for i in range(args.images)], "1920x1080 PNG": [screenshot(i) for i in range(8)]}
    contenders = loaders(args.baseline)
    best: dict[tuple[str, str, bool], float] = {}
    for r in range(args.rounds):
        names = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
        for name in names:
            for kind, images in sets.items():
                for again in (False, True):
                    # A fresh loader per round: "new" images are new to its cache.
                    load = loaders(args.baseline)[name]
                    ms = await median_ms(load, images, again)
                    key = (name, kind, again)
                    best[key] = min(ms, best.get(key, ms))
    print("| image | sent | " + " | ".join(f"{n} (ms)" for n in contenders) + " |")
    print("|---|---|" + "---|" * len(contenders))
    for kind in sets:
        for again in (False, True):
            cells = " | ".join(f"{best[(n, kind, again)]:.2f}" for n in contenders)
            print(f"| {kind} | {'again' if again else 'new'} | {cells} |")
    decoded = [(await contenders["this"](url(data)))[0] for data in sets["1920x1080 PNG"]]
    print(f"mtmd tokenize with a 1920x1080 image (tiny VLM): {tokenize_ms(decoded):.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
