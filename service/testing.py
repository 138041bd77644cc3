"""Engines without weights for testing the app in-process: auth, errors, the response cache,
lifecycle and metrics, where the test is about the server rather than a model.

    app = create_app(parse_settings({"LIGHT_MODEL_PATH": "fake/light"}), engines=fake_engines())
    with TestClient(app) as client: ...

A tier's MODEL_PATH is then just a name (a `owner/name` form needs no file). The engine contract
suites keep running the real models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

from backends.fake import FakeBackend, echo_last_line
from embedders.fake import FakeEmbedder
from rerankers.fake import FakeReranker
from service.tiers.families import EngineFactories


def fake_engines(
    *,
    reply: Callable[[str], str] = echo_last_line,
    token_seconds: float = 0.0,
    load_seconds: float = 0.0,
    fails_to_load: Callable[[str], bool] | None = None,
    sampling: Mapping[str, float] | None = None,
    sizes: Mapping[str, int] | None = None,
) -> EngineFactories:
    """`reply`: a generation tier's answer to a prompt's text; `token_seconds`: time per token;
    `load_seconds`: time a generation model's load takes; `fails_to_load(model_path)`: True for a
    generation model that fails to load (the tier is then `failed`, with the path in its error);
    `sampling`: the sampling defaults the generation models' cards give; `sizes`: the bytes each
    model (by MODEL_PATH) declares it holds, for the memory budget (others hold none)."""
    backend = functools.partial(
        FakeBackend,
        reply=reply,
        token_seconds=token_seconds,
        load_seconds=load_seconds,
        fails_to_load=fails_to_load,
        sampling=sampling,
    )
    declared = dict(sizes or {})
    return EngineFactories(
        backend=backend,
        embedder=FakeEmbedder,
        reranker=FakeReranker,
        estimate=lambda tier, path: declared.get(path, 0),
        gpu_memory=lambda: None,  # no GPU: MEMORY_BUDGET defaults to the RAM
    )


def counting(prompt: str) -> str:
    """A reply long enough to stream through an unload, a keep-alive or a busy check: 4, 5, ... 999,
    one number a token (with `token_seconds`, as slow as a test needs)."""
    return "".join(f"{i}," for i in range(4, 1000))
