"""Does llmservice load and serve a GGUF fully offloaded to the GPU beside a torch embedding tier?

    python bench/gpu_check.py --model /tmp/m.gguf [--log DIR]

Issue 10's crash: the server exited with SIGSEGV while loading a GGUF with N_GPU_LAYERS=-1 on a
CUDA build, where a plain `Llama(...)` loaded it. This starts `python -X faulthandler -m service`
with LIGHT on that GGUF (all layers on the GPU) and an EMBEDDING tier on torch's default device
(a tiny sentence-transformers model built here: the GPU machine has no hub access), waits for
both to load, prints /health and answers one chat completion and one embedding. If the server
dies, it says by which signal and prints the end of its log (faulthandler's traceback), then tries
the GGUF alone to tell the two apart. Exit status 0 only when everything answered.
On a GPU machine this runs from ../shared/gpu/run.sh (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import free_port, llmservice  # noqa: E402


def tiny_embedder(dest: Path) -> Path:
    """The tests' tiny XLM-R in sentence-transformers layout, without BGE-M3's extra heads."""
    from tests.fixtures.tiny_models import build_tiny_bge_m3

    build_tiny_bge_m3(dest)
    for name in ("colbert_linear.pt", "sparse_linear.pt"):
        (dest / name).unlink()
    return dest


def serve(env: dict[str, str], log: Path, cwd: Path, timeout: float = 240) -> bool:
    """Start the server in `cwd` (no `.env` there), check it, stop it; True when every check answered."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, full = llmservice({"PORT": str(port), "LOG_LEVEL": "INFO", **env})
    tiers = [k.removesuffix("_MODEL_PATH").lower() for k in env if k.endswith("_MODEL_PATH")]
    print(f"--- {' + '.join(tiers)}: {json.dumps(env)}")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [cmd[0], "-X", "faulthandler", *cmd[1:]], cwd=cwd, env={**os.environ, **full}, stdout=out, stderr=out
        )
        ok = False
        try:
            t0 = time.monotonic()
            health: dict[str, Any] = {}
            while time.monotonic() - t0 < timeout and proc.poll() is None:
                try:
                    health = httpx.get(f"{url}/health", timeout=5).json()
                    states = {t: (health.get("tiers") or {}).get(t, {}).get("state") for t in tiers}
                    if all(s == "loaded" for s in states.values()) or any(s == "failed" for s in states.values()):
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            if proc.poll() is not None:
                code = proc.returncode
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
                print(f"server exited with {how} after {time.monotonic() - t0:.1f} s; end of its log:")
                print("\n".join(log.read_text(errors="replace").splitlines()[-60:]))
                return False
            print(f"/health after {time.monotonic() - t0:.1f} s: {json.dumps(health)}")
            ok = True
            if "light" in tiers:
                body = {"model": "light", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
                res = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
                print(f"chat: {res.status_code} {res.text[:300]}")
                ok &= res.status_code == 200
            if "embedding" in tiers:
                res = httpx.post(f"{url}/v1/embeddings", json={"model": "embedding", "input": ["a cat"]}, timeout=60)
                dims = len(res.json()["data"][0]["embedding"]) if res.status_code == 200 else None
                print(f"embeddings: {res.status_code} dims={dims} {'' if dims else res.text[:300]}")
                ok &= res.status_code == 200
            ok &= proc.poll() is None
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"log lines mentioning the device: {[ln for ln in log.read_text().splitlines() if ' on ' in ln][:6]}")
        return ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a GGUF file")
    parser.add_argument("--log", default=os.environ.get("OUT", tempfile.gettempdir()), help="folder for server logs")
    args = parser.parse_args()
    logs = Path(args.log)
    logs.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        embedder = str(tiny_embedder(folder / "embedder"))
        light = {"LIGHT_MODEL_PATH": args.model, "LIGHT_N_GPU_LAYERS": "-1", "LIGHT_MAX_BATCH": "4"}
        embedding = {"EMBEDDING_MODEL_PATH": embedder, "EMBEDDING_ENGINE": "sentence_transformers"}
        both = serve({**light, **embedding}, logs / "serve-both.log", folder)
        alone = both or serve(light, logs / "serve-light.log", folder)
        print(f"RESULT gguf on GPU + torch embedding tier: {'ok' if both else 'FAILED'}", end="")
        print("" if both else f"; GGUF alone: {'ok' if alone else 'FAILED'}")
        sys.exit(0 if both else 1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
