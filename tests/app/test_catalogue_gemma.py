"""A model that is only a file in MODELS_DIR (no tier names it) answers through the OpenAI SDK on
first use: loaded once, counted in the memory budget at the size llama.cpp reports."""

from __future__ import annotations

import os
import time
from pathlib import Path

from openai import OpenAI

from tests.live import live_server

MODEL = "gemma-3-270m-q4_k_m"


def test_catalogue_gguf_loads_on_first_use_through_the_openai_sdk(tmp_path: Path, gemma_gguf: str) -> None:
    (tmp_path / f"{MODEL}.gguf").symlink_to(gemma_gguf)
    env = {"MODELS_DIR": str(tmp_path), "MEMORY_BUDGET": "4GiB"}
    with live_server(env) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        started = time.perf_counter()
        first = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0
        )
        first_seconds = time.perf_counter() - started
        started = time.perf_counter()
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0
        )
        warm_seconds = time.perf_counter() - started
        assert first.choices[0].message.content
        registry = server.app.state.registry
        slot = registry.slots[MODEL]
        assert slot.state.value == "loaded" and slot.kv_bytes
        held = registry.budget.holdings()[MODEL]
        assert held == os.path.getsize(gemma_gguf) + slot.kv_bytes  # llama.cpp's figure replaced the estimate
        assert slot.estimate_bytes >= held  # the header's KV bound is an upper bound
        # docs/benchmarks.md: the first request costs the load plus one warm request, nothing more.
        print(f"first={first_seconds:.3f}s load={slot.load_seconds:.3f}s warm={warm_seconds:.3f}s")
