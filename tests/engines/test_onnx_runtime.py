"""`<TIER>_RUNTIME=onnx`: the transformer exported once to ONNX and run by onnxruntime gives the
torch engine's outputs, is cached and reused, and is refused where an engine cannot run it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedders import onnx_runtime
from embedders.factory import create_embedder
from kernel.config import TierSettings
from kernel.errors import ModelUnavailableError
from rerankers.factory import create_reranker
from service.settings import SettingsError, parse_settings

TEXTS = ["A man is playing a guitar.", "Someone plays a musical instrument.", "short", "x " * 300]
PAIRS = [("what do cats eat", "cats eat fish and mice"), ("what do cats eat", "paris is the capital of france")]


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "llmservice" / "onnx"


def test_minilm_on_onnx_gives_the_torch_vectors_and_caches_the_export(
    minilm_path: str, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sorted(p.name for p in Path(minilm_path).rglob("*"))
    torch_engine = create_embedder(TierSettings(name="embedding"), minilm_path)
    torch_engine.load()
    onnx_engine = create_embedder(TierSettings(name="embedding", runtime="onnx"), minilm_path)
    onnx_engine.load()
    assert len(list(cache_home.glob("model-last_hidden_state-*.onnx"))) == 1
    assert sorted(p.name for p in Path(minilm_path).rglob("*")) == before  # the model folder is left alone
    assert onnx_engine.info() == torch_engine.info()
    ours = np.stack([o.dense for o in onnx_engine.embed(TEXTS)])  # type: ignore[misc]
    ref = np.stack([o.dense for o in torch_engine.embed(TEXTS)])  # type: ignore[misc]
    assert np.allclose(ours, ref, atol=1e-4) and np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    options = onnx_engine._onnx._session.get_session_options()  # type: ignore[attr-defined]
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # cores left to the app
    onnx_engine._pass_tokens = 1  # every text in a pass of its own: the same vectors, in input order
    alone = np.stack([o.dense for o in onnx_engine.embed(TEXTS)])  # type: ignore[misc]
    assert np.allclose(alone, ours, atol=1e-5)

    def no_export(*args: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_runtime, "_export", no_export)
    again = create_embedder(TierSettings(name="embedding", runtime="onnx"), minilm_path)
    again.load()  # the cached file, not a second export
    assert np.allclose(np.stack([o.dense for o in again.embed(TEXTS)]), ours)  # type: ignore[misc]


def test_an_unwritable_cache_is_a_clear_load_error(minilm_path: str, tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("a file where the cache folder would go")
    engine = create_embedder(TierSettings(name="embedding", runtime="onnx"), minilm_path)
    with pytest.raises(ModelUnavailableError, match="Cannot write the ONNX export"):
        engine.load()


def test_cross_encoder_on_onnx_gives_the_torch_scores(tiny_bert_ce: Path, cache_home: Path) -> None:
    torch_engine = create_reranker(TierSettings(name="reranker"), str(tiny_bert_ce))
    torch_engine.load()
    onnx_engine = create_reranker(TierSettings(name="reranker", runtime="onnx", batch_size=1), str(tiny_bert_ce))
    onnx_engine.load()
    pairs = [*PAIRS, ("long " * 200, "document " * 200)]
    assert np.allclose(onnx_engine.score_pairs(pairs), torch_engine.score_pairs(pairs), atol=1e-4)
    onnx_engine._batch_size, onnx_engine._pass_tokens = 8, 10**6  # one pass for all: the same scores
    assert np.allclose(onnx_engine.score_pairs(pairs), torch_engine.score_pairs(pairs), atol=1e-4)
    assert list(cache_home.glob("*-logits-*.onnx"))


def test_a_changed_model_replaces_its_old_export(tiny_bert_ce: Path, cache_home: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_bert_ce, tmp_path / "ce"))
    tier = TierSettings(name="reranker", runtime="onnx")
    create_reranker(tier, str(folder)).load()
    first = list(cache_home.glob("*.onnx"))
    weights = next(f for f in (folder / "model.safetensors", folder / "pytorch_model.bin") if f.is_file())
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # new weights
    create_reranker(tier, str(folder)).load()
    second = list(cache_home.glob("*.onnx"))
    assert len(first) == len(second) == 1 and first != second


def test_exports_of_models_that_are_gone_are_deleted(tiny_bert_ce: Path, cache_home: Path, tmp_path: Path) -> None:
    tier = TierSettings(name="reranker", runtime="onnx")
    kept, dropped = (Path(shutil.copytree(tiny_bert_ce, tmp_path / name)) for name in ("kept", "dropped"))
    for folder in (kept, dropped):
        create_reranker(tier, str(folder)).load()
    (cache_home / "older-logits-0123-4567.onnx").write_bytes(b"written before models were recorded")
    shutil.rmtree(dropped)
    copy = Path(shutil.copytree(tiny_bert_ce, tmp_path / "another"))
    create_reranker(tier, str(copy)).load()  # a new export tidies the cache
    assert sorted(p.name.split("-")[0] for p in cache_home.glob("*.onnx")) == ["another", "kept"]
    assert sorted(p.stem.split("-")[0] for p in cache_home.glob("*.source")) == ["another", "kept"]


def test_engines_that_cannot_run_onnx_refuse_it(tiny_bge_m3_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="EMBEDDING_RUNTIME=onnx is not supported by the bge_m3"):
        create_embedder(TierSettings(name="embedding", runtime="onnx"), str(tiny_bge_m3_path))
    with pytest.raises(SettingsError, match="LIGHT_RUNTIME does not apply to the light tier"):
        parse_settings({"LIGHT_MODEL_PATH": "x.gguf", "LIGHT_RUNTIME": "onnx"})
    with pytest.raises(SettingsError, match="RUNTIME"):
        parse_settings({"EMBEDDING_MODEL_PATH": "m", "EMBEDDING_RUNTIME": "tensorrt"})


def test_auto_runs_onnx_on_a_cpu_and_falls_back_to_torch_where_the_export_fails(
    minilm_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tier = TierSettings(name="embedding", device="cpu")  # RUNTIME=auto, the default
    engine = create_embedder(tier, minilm_path)
    engine.load()
    assert engine._onnx is not None  # type: ignore[attr-defined]

    def broken(*args: object) -> None:
        raise RuntimeError("an op the exporter does not know")

    monkeypatch.setattr(onnx_runtime, "_export", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))  # nothing cached there
    fallback = create_embedder(tier, minilm_path)
    fallback.load()
    assert fallback._onnx is None  # type: ignore[attr-defined]
    assert "runs on torch (RUNTIME=auto)" in caplog.text and "an op the exporter does not know" in caplog.text
    assert np.allclose(fallback.embed(TEXTS)[0].dense, engine.embed(TEXTS)[0].dense, atol=1e-4)  # type: ignore[arg-type]
    strict = create_embedder(TierSettings(name="embedding", runtime="onnx"), minilm_path)
    with pytest.raises(ModelUnavailableError, match="an op the exporter does not know"):
        strict.load()
