"""`POST /v1/models/pull` and `DELETE /v1/models/{id}` against a stand-in hub (tests/fake_hub.py,
through HF_ENDPOINT), on the fake engines: the test is about what lands in MODELS_DIR."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import huggingface_hub.constants
import pytest
from litestar.testing import TestClient

from service.app import create_app
from service.serving import hub as hub_module
from service.settings import parse_settings
from service.testing import fake_engines
from tests.fake_hub import FakeHub
from tests.fixtures.tiny_mamba import build_tiny_mamba
from tests.live import live_server


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build_tiny_mamba(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


@pytest.fixture
def hub(gguf: bytes, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    half = len(gguf) // 2
    fake = FakeHub(
        repos={
            "test/Tiny-GGUF": {
                "tiny-Q4_K_M.gguf": gguf,
                "tiny-Q8_0.gguf": gguf + b"\0" * 64,
                "mmproj-tiny-Q4_K_M.gguf": b"projector",
                "README.md": b"# tiny\n",
            },
            "test/Split-GGUF": {
                "Q4_K_M/big-Q4_K_M-00001-of-00002.gguf": gguf[:half],
                "Q4_K_M/big-Q4_K_M-00002-of-00002.gguf": gguf[half:],
                "big-Q8_0.gguf": gguf,
            },
            "test/Tiny-MLX": {"config.json": b'{"model_type": "tiny"}', "model.safetensors": b"weights" * 100},
        }
    )
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    # conftest keeps huggingface_hub offline; this hub is the test's own, on 127.0.0.1
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield fake
    fake.close()


@pytest.fixture
def models(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def client(models: Path) -> Iterator[TestClient[Any]]:
    settings = parse_settings({"LIGHT_MODEL_PATH": "fake/light", "MODELS_DIR": str(models)})
    with TestClient(create_app(settings, engines=fake_engines()), base_url="http://127.0.0.1") as test_client:
        yield test_client


def events(body: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


def leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.rglob("*") if p.name.endswith(".partial"))


def test_pull_streams_progress_and_lands_the_one_quant(
    hub: FakeHub, client: TestClient[Any], models: Path, gguf: bytes
) -> None:
    response = client.post("/v1/models/pull", json={"model": "test/Tiny-GGUF:Q4_K_M"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    got = events(response.text)
    progress = [e for e in got if e["status"] == "downloading"]
    assert progress and progress[-1] == {**progress[-1], "file": "tiny-Q4_K_M.gguf", "completed": len(gguf)}
    assert all(e["total"] == len(gguf) and "rate" in e for e in progress)
    assert got[-1] == {"status": "success", "id": "tiny-Q4_K_M"}
    assert sorted(os.listdir(models)) == ["tiny-Q4_K_M.gguf"]  # not the mmproj, not the other quant
    assert (models / "tiny-Q4_K_M.gguf").read_bytes() == gguf


def test_pull_picks_by_quant_file_or_split_set(hub: FakeHub, client: TestClient[Any], models: Path) -> None:
    pulled = client.post("/v1/models/pull", json={"model": "test/Tiny-GGUF:tiny-Q8_0.gguf", "stream": False})
    assert pulled.status_code == 200, pulled.text
    assert pulled.json() == {"status": "success", "id": "tiny-Q8_0"}
    split = client.post("/v1/models/pull", json={"model": "test/Split-GGUF:q4_k_m", "stream": False})
    assert split.json() == {"status": "success", "id": "big-Q4_K_M"}
    assert sorted(os.listdir(models)) == [
        "big-Q4_K_M-00001-of-00002.gguf",
        "big-Q4_K_M-00002-of-00002.gguf",
        "tiny-Q8_0.gguf",
    ]
    ambiguous = client.post("/v1/models/pull", json={"model": "test/Split-GGUF:Q5_K_M", "stream": False})
    assert ambiguous.status_code == 400 and "big-Q8_0" in ambiguous.json()["error"]["message"]
    missing = client.post("/v1/models/pull", json={"model": "test/Nothing:Q4_K_M", "stream": False})
    assert missing.status_code == 404


def test_a_repo_without_ggufs_is_pulled_into_a_folder(hub: FakeHub, client: TestClient[Any], models: Path) -> None:
    hub.lfs = False  # every file then checked by its git blob id
    response = client.post("/v1/models/pull", json={"model": "test/Tiny-MLX", "stream": False})
    assert response.json() == {"status": "success", "id": "Tiny-MLX"}
    assert (models / "Tiny-MLX" / "model.safetensors").read_bytes() == b"weights" * 100
    assert (models / "Tiny-MLX" / "config.json").read_bytes() == b'{"model_type": "tiny"}'
    assert sorted(os.listdir(models)) == ["Tiny-MLX"]  # filled under a hidden name, then renamed whole


def test_a_cut_download_resumes_with_a_range_request(
    hub: FakeHub, client: TestClient[Any], models: Path, gguf: bytes
) -> None:
    hub.cut_once.add("tiny-Q4_K_M.gguf")
    response = client.post("/v1/models/pull", json={"model": "test/Tiny-GGUF:Q4_K_M"})
    assert events(response.text)[-1] == {"status": "success", "id": "tiny-Q4_K_M"}
    assert hub.ranges == [f"bytes={len(gguf) // 2}-"]
    assert (models / "tiny-Q4_K_M.gguf").read_bytes() == gguf
    assert leftovers(models) == []


def test_a_checksum_mismatch_is_refused_and_leaves_no_file(hub: FakeHub, client: TestClient[Any], models: Path) -> None:
    hub.corrupt.add("tiny-Q4_K_M.gguf")
    final = events(client.post("/v1/models/pull", json={"model": "test/Tiny-GGUF:Q4_K_M"}).text)[-1]
    assert final["status"] == "error" and final["error"]["code"] == "checksum_mismatch"
    assert list(models.iterdir()) == []
    blocking = client.post("/v1/models/pull", json={"model": "test/Tiny-GGUF:Q4_K_M", "stream": False})
    assert blocking.status_code == 502 and blocking.json()["error"]["code"] == "checksum_mismatch"


def test_a_pull_without_the_disk_space_is_refused_before_it_starts(
    hub: FakeHub, client: TestClient[Any], models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "_free_bytes", lambda _: 10)
    response = client.post("/v1/models/pull", json={"model": "test/Tiny-GGUF:Q4_K_M", "stream": False})
    assert response.status_code == 400 and response.json()["error"]["code"] == "insufficient_storage"
    assert hub.ranges == [] and list(models.iterdir()) == []


@pytest.mark.parametrize(
    "spec",
    ["../etc", "test/..", "/abs/path", "test/Tiny-GGUF:../../escape.gguf", "test/Tiny-GGUF:/etc/passwd.gguf", "x"],
)
def test_names_that_would_leave_models_dir_are_refused(
    hub: FakeHub, client: TestClient[Any], models: Path, spec: str
) -> None:
    response = client.post("/v1/models/pull", json={"model": spec, "stream": False})
    assert response.status_code == 400, response.text
    assert not models.exists() or list(models.iterdir()) == []


def test_a_symlink_in_models_dir_is_not_followed(
    hub: FakeHub, client: TestClient[Any], models: Path, tmp_path: Path
) -> None:
    models.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (models / "Tiny-MLX").symlink_to(outside)
    response = client.post("/v1/models/pull", json={"model": "test/Tiny-MLX", "stream": False})
    assert response.status_code == 403
    assert list(outside.iterdir()) == []
    assert client.delete("/v1/models/Tiny-MLX").status_code == 403
    assert client.delete("/v1/models/..").status_code in (403, 404)
    assert outside.exists()


def test_delete_removes_a_pulled_model_unless_a_tier_has_it_loaded(
    hub: FakeHub, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = models / "tiny-Q4_K_M.gguf"
    settings = parse_settings({"LIGHT_MODEL_PATH": "fake/light", "MODELS_DIR": str(models)})
    with TestClient(create_app(settings, engines=fake_engines()), base_url="http://127.0.0.1") as client:
        assert client.post("/v1/models/pull", json={"model": "test/Tiny-GGUF", "stream": False}).status_code == 200
        assert client.post("/v1/models/pull", json={"model": "test/Split-GGUF:Q4_K_M", "stream": False}).is_success
        assert client.post("/v1/models/light/load", json={"model_path": str(path)}).status_code == 200
        busy = client.delete("/v1/models/tiny-Q4_K_M")
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "model_loaded"
        assert path.exists()
        gone = client.delete("/v1/models/big-Q4_K_M")
        assert gone.json() == {"id": "big-Q4_K_M", "deleted": True, "object": "model"}
        assert sorted(os.listdir(models)) == ["tiny-Q4_K_M.gguf"]
        assert client.delete("/v1/models/big-Q4_K_M").status_code == 404
        assert client.post("/v1/models/light/unload").status_code == 200
        assert client.delete("/v1/models/tiny-Q4_K_M").status_code == 200
        assert list(models.iterdir()) == []


def test_a_streamed_pull_stops_when_its_client_disconnects(
    hub: FakeHub, models: Path, gguf: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a real server (a disconnect is a socket closing): the download stops at its next chunk,
    the `.partial` file stays, and the next pull resumes it with a Range request."""
    started: list[threading.Event | None] = []
    ended = threading.Event()
    outcome: list[BaseException | str] = []
    real_pull = hub_module.pull

    def watched(*args: Any, **kwargs: Any) -> str:
        started.append(args[3] if len(args) > 3 else kwargs.get("stop"))
        try:
            result = real_pull(*args, **kwargs)
            outcome.append(result)
            return result
        except BaseException as exc:
            outcome.append(exc)
            raise
        finally:
            ended.set()

    monkeypatch.setattr(hub_module, "pull", watched)
    hub.held["tiny-Q4_K_M.gguf"] = release = threading.Event()
    env = {"LIGHT_MODEL_PATH": "fake/light", "MODELS_DIR": str(models)}
    with live_server(env, engines=fake_engines()) as server:
        with httpx.stream("POST", f"{server.url}/v1/models/pull", json={"model": "test/Tiny-GGUF:Q4_K_M"}) as res:
            for line in res.iter_lines():
                if '"downloading"' in line:
                    break  # half the file is in; the client goes away
        stop = started[0]
        assert stop is not None and stop.wait(10), "the disconnect did not reach the pull"
        release.set()  # the hub sends the rest: the pull must not take it
        assert ended.wait(10)
        assert isinstance(outcome[0], hub_module.PullStopped)
        assert not (models / "tiny-Q4_K_M.gguf").exists()
        assert leftovers(models) == ["tiny-Q4_K_M.gguf.partial"]
        kept = (models / "tiny-Q4_K_M.gguf.partial").stat().st_size
        assert 0 < kept <= len(gguf) // 2  # what arrived before the disconnect, to the chunk
        del hub.held["tiny-Q4_K_M.gguf"]
        again = httpx.post(f"{server.url}/v1/models/pull", json={"model": "test/Tiny-GGUF:Q4_K_M", "stream": False})
        assert again.json() == {"status": "success", "id": "tiny-Q4_K_M"}
    assert hub.ranges == [f"bytes={kept}-"]
    assert (models / "tiny-Q4_K_M.gguf").read_bytes() == gguf and leftovers(models) == []
