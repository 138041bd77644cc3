"""Images: llmservice vs llama-server with the same GGUF and projector, or vs mlx-vlm's own server
with the same MLX model folder (issue 26).

    python bench/bench_vision.py [--model GGUF --mmproj GGUF] [--concurrency 1,4] [--requests 8] [--rounds 3]
        [--baseline /work/main]    # also another checkout's llmservice, side by side (an A/B of a change)
    python bench/bench_vision.py --engine mlx [--model FOLDER] [--concurrency 1,4] ...

Each request is one chat turn with one image never sent before (pseudo-random pixels: no KV reuse)
and `max_tokens` 1, so its latency is the time to its first token: the image preprocessed,
encoded by the projector and decoded into the KV with the text around it. At each concurrency C,
C clients send `--requests` requests each; images/s is requests over the wall time. Both servers
run with C sequences (llmservice `MAX_BATCH=C`, llama-server `-np C`), the same threads
(`BENCH_THREADS`) and context per sequence; the contenders alternate round by round and each
figure is the best of `--rounds`. Default model: the tiny random VLM of the tests
(tests/fixtures/tiny_vlm_gguf.py, a LLaVA "mlp" projector on 32x32 images), which shows the serving
cost around the encoder; a real VLM's encoder dominates on a CPU. With `--engine mlx` the default
is the tiny random LLaVA of the tests (tests/fixtures/tiny_vlm.py), served by our MLX tier and by
`python -m mlx_vlm.server` (continuous batching on; see `mlx_vlm_server` for the one patch it needs).
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import itertools
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, free_port, llmservice, process
from bench.bench_generation import LLAMA_SERVER, N_CTX, THREADS

_serial = itertools.count()


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    model: str


@contextmanager
def ours(model: str, mmproj: str, parallel: int, root: Path = ROOT, engine: str = "llamacpp") -> Iterator[Server]:
    """llmservice from the checkout at `root` (this one unless `--baseline` names another)."""
    port = free_port()
    env = {
        "PORT": str(port),
        "LIGHT_MODEL_PATH": model,
        "LIGHT_N_CTX": str(N_CTX),
        "LIGHT_MAX_BATCH": str(parallel),
        "LIGHT_MAX_QUEUE": "64",
        "ENABLE_CACHE": "false",
        "PYTHONPATH": str(root),
    }
    if engine == "mlx":
        env["LIGHT_BACKEND"] = "mlx"
    else:
        env.update({"LIGHT_MMPROJ_PATH": mmproj, "LIGHT_N_THREADS": str(THREADS)})
    cmd, full = llmservice(env)
    url = f"http://127.0.0.1:{port}"
    with process(cmd, f"{url}/health", full, ready='"loaded"'):
        yield Server("llmservice", url, "light")


# mlx-vlm 0.7.10's LlavaProcessor hands the tokenizer's `padding` to the image processor, which
# transformers 5.x refuses (a 500 for every image): its server runs with that one argument dropped.
_MLX_VLM_SERVER = """
import sys
from mlx_vlm.models.llava import processing_llava
call = processing_llava.LlavaProcessor.__call__
def drop_padding(self, images=None, text=None, **kwargs):
    kwargs.pop("padding", None)
    return call(self, images=images, text=text, **kwargs)
processing_llava.LlavaProcessor.__call__ = drop_padding
from mlx_vlm.server import main
sys.argv = ["mlx_vlm.server", *sys.argv[1:]]
main()
"""


# The tiny LLaVA's template renders string content (our engine's); mlx-vlm's server renders the
# OpenAI parts through it, so its copy of the folder gets a template that writes `<image>` for them.
_PARTS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] in ('image', 'image_url') %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def peer_folder(model: Path) -> Path:
    import shutil

    peer = model.with_name(model.name + "-parts")
    shutil.copytree(model, peer, dirs_exist_ok=True)
    (peer / "chat_template.jinja").write_text(_PARTS_TEMPLATE)
    return peer


@contextmanager
def mlx_vlm_server(model: str, mmproj: str, parallel: int, folder: str = "") -> Iterator[Server]:
    """`folder`: the model to serve instead of `model` (the tiny one's copy, see `peer_folder`)."""
    model = folder or model
    port = free_port()
    cmd = [sys.executable, "-c", _MLX_VLM_SERVER, "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--max-num-seqs", str(parallel), "--log-level", "WARNING"]
    url = f"http://127.0.0.1:{port}"
    with process(cmd, f"{url}/health", ready='"healthy"'):
        yield Server("mlx_vlm.server", url, model)


@contextmanager
def llama_server(model: str, mmproj: str, parallel: int) -> Iterator[Server]:
    port = free_port()
    cmd = [LLAMA_SERVER, "-m", model, "--mmproj", mmproj, "-c", str(N_CTX * parallel), "-np", str(parallel)]
    cmd += ["-t", str(THREADS), "-tb", str(THREADS), "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with process(cmd, f"{url}/health"):
        yield Server(f"llama-server -np {parallel}", url, "vlm")


def new_image(size: int = 64) -> str:
    """A PNG data URL of pixels no request has sent before."""
    from PIL import Image

    seed = next(_serial)
    pixels = bytes((seed * 7919 + i * 104729) % 251 for i in range(size * size * 3))
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def one(client: httpx.Client, server: Server) -> float:
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": new_image()}},
    ]
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 1,
        "temperature": 0,
    }
    start = time.perf_counter()
    res = client.post(f"{server.url}/v1/chat/completions", json=body)
    res.raise_for_status()
    return time.perf_counter() - start


def measure(server: Server, concurrency: int, requests: int) -> tuple[float, float]:
    """(images/s over the wall time, median seconds to the first token)."""
    with httpx.Client(timeout=300) as client:
        one(client, server)  # warm: the first image allocates the encoder's buffers
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(lambda _: one(client, server), range(concurrency * requests)))
        wall = time.perf_counter() - start
    return concurrency * requests / wall, statistics.median(latencies)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("llamacpp", "mlx"), default="llamacpp")
    parser.add_argument("--model")
    parser.add_argument("--mmproj")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="another checkout whose llmservice runs side by side (e.g. /work/main)")
    args = parser.parse_args()
    if args.engine == "mlx":
        if not args.model:
            from tests.fixtures.tiny_vlm import build_tiny_vlm

            model = build_tiny_vlm(Path("/tmp/bench-tiny-vlm-mlx"))
            args.model = str(model)
            peer_name, peer = "mlx_vlm.server", functools.partial(mlx_vlm_server, folder=str(peer_folder(model)))
        else:
            peer_name, peer = "mlx_vlm.server", mlx_vlm_server
        print(f"model {Path(args.model).name} (MLX)")
    else:
        if not args.model:
            from tests.fixtures.tiny_vlm_gguf import build_tiny_vlm_gguf

            model, mmproj = build_tiny_vlm_gguf(Path("/tmp/bench-tiny-vlm"))
            args.model, args.mmproj = str(model), str(mmproj)
        peer_name, peer = "llama-server", llama_server
        print(f"model {Path(args.model).name} + {Path(args.mmproj).name}, {THREADS} threads")
    contenders = {"llmservice": functools.partial(ours, engine=args.engine)}
    if args.baseline:
        contenders["baseline"] = functools.partial(ours, root=Path(args.baseline), engine=args.engine)
    contenders[peer_name] = peer
    print("| concurrency | contender | images/s | TTFT median (ms) |")
    print("|---|---|---|---|")
    for c in (int(x) for x in args.concurrency.split(",")):
        best: dict[str, tuple[float, float]] = {}
        names = list(contenders)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                with contenders[name](args.model, args.mmproj, c) as server:
                    rate, ttft = measure(server, c, args.requests)
                old = best.get(name)
                best[name] = (max(rate, old[0]), min(ttft, old[1])) if old else (rate, ttft)
        for name, (rate, ttft) in best.items():
            print(f"| {c} | {name} | {rate:.2f} | {ttft * 1000:.1f} |")
        peer_rate, peer_ttft = best[peer_name]
        # Both ratios read "ours as a share of the peer's": above 1 is better.
        for name in names[:-1]:
            rate, ttft = best[name]
            print(f"| {c} | ratio, {name} / {peer_name} | {rate / peer_rate:.2f}x | {peer_ttft / ttft:.2f}x |")


if __name__ == "__main__":
    main()
