"""`python -m service` as a user runs it: the port file, a taken port, idle exit, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def service(tmp_path: Path, **env: str) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    full_env = {k: v for k, v in os.environ.items() if k.split("_", 1)[0] not in {"LIGHT", "PORT"}}
    full_env |= {"PYTHONPATH": str(ROOT), "LOG_LEVEL": "INFO", **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=tmp_path,
        env=full_env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc, tmp_path / ".port"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def wait_ready(proc: subprocess.Popen[str], port_file: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        if port_file.exists():
            url = f"http://127.0.0.1:{int(port_file.read_text())}"
            try:
                if httpx.get(f"{url}/health").json()["tiers"]["light"]["state"] == "loaded":
                    return url
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    raise TimeoutError("service did not become ready")


def test_port_file_written_and_removed_on_sigterm(tmp_path: Path, gemma_gguf: str) -> None:
    port = free_port()
    with service(tmp_path, LIGHT_MODEL_PATH=gemma_gguf, PORT=str(port)) as (proc, port_file):
        url = wait_ready(proc, port_file)
        assert url.endswith(f":{port}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not port_file.exists()
        log = proc.stdout.read() if proc.stdout else ""
    # The documented log format: timestamp - module - level - message.
    assert any(" - service.tiers.registry - INFO - Tier light" in line for line in log.splitlines()), log
    # Start-up ends with one line saying where the server is and what it serves.
    assert f"INFO - Ready on {url}/v1: light/gemma-3-270m (llamacpp on cpu)" in log, log


def test_taken_port_moves_to_the_next_free_one(tmp_path: Path, gemma_gguf: str) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        with service(tmp_path, LIGHT_MODEL_PATH=gemma_gguf, PORT=str(taken)) as (proc, port_file):
            url = wait_ready(proc, port_file)
            assert int(url.rsplit(":", 1)[1]) > taken
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        with service(tmp_path, LIGHT_MODEL_PATH=gemma_gguf, PORT=str(taken), PORT_AUTO_INCREMENT="false") as (proc, _):
            assert proc.wait(30) != 0
            assert f"Port {taken} is in use" in (proc.stdout.read() if proc.stdout else "")
    finally:
        blocker.close()


def test_idle_shutdown(tmp_path: Path, gemma_gguf: str) -> None:
    with service(tmp_path, LIGHT_MODEL_PATH=gemma_gguf, PORT=str(free_port()), SHUTDOWN_TIMEOUT="3") as (proc, pf):
        wait_ready(proc, pf)
        assert proc.wait(30) == 0
        assert not pf.exists()


def test_sigterm_lets_a_running_stream_finish(tmp_path: Path, gemma_gguf: str) -> None:
    env = {"LIGHT_MODEL_PATH": gemma_gguf, "PORT": str(free_port()), "DRAIN_SECONDS": "20"}
    with service(tmp_path, **env) as (proc, port_file):
        url = wait_ready(proc, port_file)
        body = {"model": "light", "prompt": "Count:", "max_tokens": 40, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as res:
            lines = res.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert "data: [DONE]" in rest
        assert proc.wait(30) == 0


@pytest.mark.parametrize("variable", ["LIGHT_BACKEND=vllm"])
def test_bad_config_exits_before_binding(tmp_path: Path, variable: str) -> None:
    key, value = variable.split("=")
    with service(tmp_path, LIGHT_MODEL_PATH="/nowhere.gguf", **{key: value}) as (proc, port_file):
        assert proc.wait(30) == 2
        assert not port_file.exists()


def test_a_stream_longer_than_the_drain_ends_with_an_error_event(tmp_path: Path, gemma_gguf: str) -> None:
    env = {"LIGHT_MODEL_PATH": gemma_gguf, "PORT": str(free_port()), "DRAIN_SECONDS": "2"}
    with service(tmp_path, **env) as (proc, port_file):
        url = wait_ready(proc, port_file)
        body = {"model": "light", "prompt": "Count:", "max_tokens": 5000, "stream": True, "min_p": 0, "top_k": 0}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as res:
            lines = res.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]  # the body ends cleanly: no RemoteProtocolError
        assert rest[-1] == "data: [DONE]"
        assert '"code":"server_shutting_down"' in rest[-2]
        assert proc.wait(30) == 0


def test_a_stale_port_file_is_replaced(tmp_path: Path, gemma_gguf: str) -> None:
    port_file = tmp_path / ".port"
    port_file.write_text("1\n")  # left behind by a server killed with -9
    port = free_port()
    with service(tmp_path, LIGHT_MODEL_PATH=gemma_gguf, PORT=str(port)) as (proc, _):
        assert wait_ready(proc, port_file).endswith(f":{port}")
        assert port_file.read_text() == f"{port}\n"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".port")] == [".port"]
        proc.kill()  # kill -9 leaves it behind ...
        proc.wait(10)
    assert port_file.read_text() == f"{port}\n"
    with service(tmp_path, LIGHT_MODEL_PATH=gemma_gguf, PORT=str(free_port())) as (proc, _):
        url = wait_ready(proc, port_file)  # ... and the next start overwrites it
        assert url.endswith(f":{int(port_file.read_text())}") and int(port_file.read_text()) != port
