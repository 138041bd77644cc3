"""The `llmservice` command through its entry point (`service.cli:main`, in a subprocess): pull, ls, rm
on MODELS_DIR alone, and pull/ls/ps/rm/run against a live server on the fake engines, with the
stand-in hub of tests/fake_hub.py behind HF_ENDPOINT."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import uvicorn

from service.app import create_app
from service.settings import parse_settings
from service.testing import fake_engines
from tests.fake_hub import FakeHub
from tests.fixtures.tiny_mamba import build_tiny_mamba

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # `run` chats: a model from the hub has one
    gguf = build_tiny_mamba(tmp_path_factory.mktemp("gguf") / "tiny.gguf", chat_template=template).read_bytes()
    fake = FakeHub(repos={"test/Tiny-GGUF": {"tiny-Q4_K_M.gguf": gguf, "tiny-Q8_0.gguf": gguf + b"\0" * 8}})
    yield fake
    fake.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def workdir(tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with its own .env, as a user's checkout: MODELS_DIR inside, a port nothing answers on;
    the hub is the stand-in (conftest keeps huggingface_hub offline; this one is on 127.0.0.1)."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    (tmp_path / ".env").write_text(
        f"MODELS_DIR={tmp_path / 'models'}\nPORT={_free_port()}\nPORT_FILE={tmp_path / '.port'}\n"
        "LIGHT_MODEL_PATH=fake/light\n"
    )
    return tmp_path


def cli(workdir: Path, *args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVICE_")} | {"PYTHONPATH": str(ROOT)}
    if url:
        env["LLMSERVICE_URL"] = url
    command = [sys.executable, "-m", "service.cli", *args]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)


def test_pull_ls_rm_on_models_dir_without_a_server(workdir: Path) -> None:
    pulled = cli(workdir, "pull", "test/Tiny-GGUF:Q8_0")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == "tiny-Q8_0"
    assert "pulled tiny-Q8_0.gguf" in pulled.stderr  # not a TTY: plain lines, no bar
    assert (workdir / "models" / "tiny-Q8_0.gguf").is_file()
    # What the catalogue would not serve is not listed: a file that is no GGUF, half a split set.
    (workdir / "models" / "broken.gguf").write_bytes(b"<html>rate limited</html>")
    (workdir / "models" / "half-00001-of-00002.gguf").write_bytes((workdir / "models" / "tiny-Q8_0.gguf").read_bytes())
    listed = cli(workdir, "ls")
    assert listed.returncode == 0
    assert listed.stdout.splitlines()[0].split() == ["ID", "TIER", "STATUS", "SIZE"]
    on_disk = [line.split()[0] for line in listed.stdout.splitlines() if line.split()[1:3] == ["on", "disk"]]
    assert on_disk == ["tiny-Q8_0"]
    (workdir / "models" / "broken.gguf").unlink()
    (workdir / "models" / "half-00001-of-00002.gguf").unlink()
    assert cli(workdir, "rm", "tiny-Q8_0").returncode == 0
    assert list((workdir / "models").iterdir()) == []
    missing = cli(workdir, "rm", "tiny-Q8_0")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and missing.stderr.startswith("llmservice: ")
    assert cli(workdir, "ps").returncode == 1  # no server
    assert cli(workdir, "pull").returncode == 2  # usage
    assert cli(workdir, "nonsense").returncode == 2


def test_config_masks_secrets(workdir: Path) -> None:
    with (workdir / ".env").open("a") as env:
        env.write("API_KEYS=sk-very-secret\n")
    shown = cli(workdir, "config")
    assert shown.returncode == 0
    assert "sk-very-secret" not in shown.stdout and '"api_keys": "********"' in shown.stdout
    assert '"models_dir": "' + str(workdir / "models") + '"' in shown.stdout


@pytest.fixture
def server(workdir: Path) -> Iterator[str]:
    """llmservice on the fake engines in a thread of the test, pulling from the stand-in hub."""
    settings = parse_settings({"LIGHT_MODEL_PATH": "fake/light", "MODELS_DIR": str(workdir / "models")})
    port = _free_port()
    live = uvicorn.Server(uvicorn.Config(create_app(settings, engines=fake_engines()), port=port, log_config=None))
    thread = threading.Thread(target=live.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not live.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    live.should_exit = True
    thread.join(timeout=10)


def test_pull_ls_ps_rm_run_against_a_running_server(workdir: Path, server: str) -> None:
    pulled = cli(workdir, "pull", "test/Tiny-GGUF", url=server)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == "tiny-Q4_K_M"  # no quant named: Q4_K_M
    assert (workdir / "models" / "tiny-Q4_K_M.gguf").is_file()
    answer = cli(workdir, "run", "light", "say hello", url=server)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == "say hello"  # the fake engine echoes the prompt's last line
    loaded = cli(workdir, "ps", url=server)
    assert loaded.returncode == 0 and "light" in loaded.stdout
    listed = cli(workdir, "ls", url=server).stdout
    assert "tiny-Q4_K_M" in listed and "light" in listed
    unknown = cli(workdir, "run", "no-such-model", "hi", url=server)
    assert unknown.returncode == 1 and unknown.stderr.startswith("llmservice: ")
    assert cli(workdir, "rm", "tiny-Q4_K_M", url=server).returncode == 0
    assert list((workdir / "models").iterdir()) == []


def test_run_a_freshly_pulled_model_by_its_catalogue_id(workdir: Path, server: str) -> None:
    """Needs MODELS_DIR's catalogue (issue 27 items 1-2, branch h4-catalogue): a pulled id is a `model`."""
    assert cli(workdir, "pull", "test/Tiny-GGUF:Q4_K_M", url=server).returncode == 0
    answer = cli(workdir, "run", "tiny-Q4_K_M", "say hello", url=server)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == "say hello"


def test_run_starts_a_server_when_none_answers(workdir: Path, gemma_gguf: str) -> None:
    """`run` with nothing on the port starts `python -m service` in the background (here on the real
    Gemma GGUF), waits for /health and streams the answer; the server then keeps running."""
    (workdir / ".env").write_text(
        f"PORT={_free_port()}\nPORT_FILE={workdir / '.port'}\nLIGHT_MODEL_PATH={gemma_gguf}\nLIGHT_MAX_TOKENS=4\n"
    )
    done = cli(workdir, "run", "light", "The capital of France is")
    started = [line for line in done.stderr.splitlines() if "started llmservice in the background" in line]
    pid = int(started[0].split("pid ")[1].split(",")[0]) if started else None
    try:
        assert done.returncode == 0, done.stderr
        assert pid is not None and done.stdout.strip()
        assert cli(workdir, "ps").returncode == 0  # the server it started still answers
    finally:
        if pid is not None:
            os.kill(pid, 15)


def test_pull_then_run_from_a_fresh_install(tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's target, through the entry point: the `.env` a fresh install has (a copy of
    .env.example, not edited), `llmservice pull <repo>` from the stand-in hub, then `llmservice run
    <id> "hi"`, which starts a server (real llama.cpp) that loads the pulled GGUF on first use. The
    environment only points at the stand-in hub and a free port, and leaves the default tiers unloaded."""
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name, value in {"PORT": str(_free_port()), "MODELS_DIR": None, "LIGHT_MAX_TOKENS": "4"}.items():
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    for tier in ("LIGHT", "EMBEDDING", "RERANKER"):
        monkeypatch.setenv(f"{tier}_PRELOAD", "false")
    pulled = cli(tmp_path, "pull", "test/Tiny-GGUF:Q4_K_M")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == "tiny-Q4_K_M" and (tmp_path / "models" / "tiny-Q4_K_M.gguf").is_file()
    done = cli(tmp_path, "run", "tiny-Q4_K_M", "hi")
    started = [line for line in done.stderr.splitlines() if "started llmservice in the background" in line]
    pid = int(started[0].split("pid ")[1].split(",")[0]) if started else None
    try:
        assert done.returncode == 0, done.stderr + (tmp_path / "llmservice.log").read_text(errors="replace")[-3000:]
        assert pid is not None
        listed = cli(tmp_path, "ls").stdout
        assert any(line.split()[:1] == ["tiny-Q4_K_M"] and "loaded" in line for line in listed.splitlines()), listed
    finally:
        if pid is not None:
            os.kill(pid, 15)
