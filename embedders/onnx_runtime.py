"""`<TIER>_RUNTIME`: a torch engine's transformer exported once to ONNX and run by onnxruntime
(`onnx`; `auto`, the default, does so on a CPU and falls back to torch where the export fails).

On a CPU onnxruntime runs BERT-sized encoders faster than eager torch (fused attention and
layer-norm kernels, no per-op dispatch), most of all for small batches. The export is traced from
the model torch loaded, so it computes the same function. It is cached under
`$XDG_CACHE_HOME/llmservice/onnx/` (`~/.cache/...`), keyed by the model's path, its weights' size
and mtime and the exporter's versions, so a changed model is exported again and its old export
deleted (one file per model path and output), as are the exports of models whose folder is gone.
Never inside the model folder: other tools take any ONNX file they find there for the model's own
export (infinity's optimum engine refused to start on ours). What follows the transformer
(pooling, dense layers, normalisation, a classifier head) stays the model's own torch code.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kernel.errors import ModelUnavailableError

log = logging.getLogger(__name__)

_OPSET = 17
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "config.json")


def available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_or_torch(runtime: str, device: str, model_path: str, build: Callable[[], OnnxModule]) -> OnnxModule | None:
    """What a tier's transformer runs on: `build()`'s module, or None for torch."""
    if runtime == "torch" or (runtime == "auto" and (device != "cpu" or not available())):
        return None
    if device != "cpu":
        raise ModelUnavailableError(f"RUNTIME=onnx runs on the CPU; {model_path} is set to run on {device}")
    try:
        return build()
    except ModelUnavailableError as exc:
        if runtime == "onnx":
            raise
        log.warning("%s runs on torch (RUNTIME=auto): %s", model_path, exc.message)
        return None


class OnnxModule:
    """A Hugging Face model (`module(**{name: LongTensor}, return_dict=True)`) run by onnxruntime,
    for the one output `output` names (`last_hidden_state`, `logits`)."""

    def __init__(
        self, module: Any, inputs: Sequence[str], output: str, model_path: str, *, threads: int, graph: str = ""
    ) -> None:
        """`graph` names what `module` computes when it is not the model's own forward (part of the
        cache key, so the two exports never stand in for each other)."""
        if not available():
            raise ModelUnavailableError("RUNTIME=onnx needs onnxruntime and onnx: pip install 'llmservice[embeddings]'")
        import onnxruntime as ort

        self.inputs = tuple(inputs)
        path = _cached(model_path, output, graph, lambda target: _export(module, self.inputs, output, target))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        # Idle pool threads sleep instead of spinning: spinning took the cores the event loop and
        # tokenisers need between passes (rerank 4-10 % more documents/s on 2 cores without it).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a corrupt cache file: say which, so it can be deleted
            raise ModelUnavailableError(f"onnxruntime cannot open {path}: {exc}") from exc
        log.info("%s: %s computed by onnxruntime (%s)", model_path, output, path)

    def run(self, feeds: dict[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
        out = self._session.run(None, {name: feeds[name].astype(np.int64, copy=False) for name in self.inputs})[0]
        return np.asarray(out, dtype=np.float32)


def _export(module: Any, inputs: tuple[str, ...], output: str, target: Path) -> None:
    import torch

    class Positional(torch.nn.Module):  # the exporter passes inputs by position
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            result: torch.Tensor = getattr(
                self.inner(**dict(zip(inputs, tensors, strict=True)), return_dict=True), output
            )
            return result

    example = tuple(torch.ones((2, 8), dtype=torch.long) for _ in inputs)
    if "attention_mask" in inputs:
        # A padded row, so that a library shortcut for "no padding anywhere" (attention mask
        # dropped) is not what the trace records: every batch we run after is padded.
        example[inputs.index("attention_mask")][1, 5:] = 0
    axes = {name: {0: "batch", 1: "tokens"} for name in (*inputs, "output")}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]  # shape checks
        # The TorchScript exporter: traces in a second or two (the dynamo one needs onnxscript too).
        torch.onnx.export(
            Positional().eval(),
            example,
            str(target),
            input_names=list(inputs),
            output_names=["output"],
            dynamic_axes=axes,
            opset_version=_OPSET,
            dynamo=False,
        )


def _cached(model_path: str, output: str, graph: str, export: Callable[[Path], None]) -> Path:
    folder = _cache_home()
    source = Path(model_path)
    stem = f"{source.name}-{output}-{_digest(output, str(source.resolve()))}"  # this model's exports
    path = folder / f"{stem}-{_key(source, graph)}.onnx"
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".onnx.tmp")
    except OSError as exc:
        raise ModelUnavailableError(f"Cannot write the ONNX export of {model_path} under {folder}: {exc}") from exc
    os.close(fd)
    log.info("Exporting %s (%s) to ONNX at %s", model_path, output, path)
    try:
        export(Path(tmp))
        # Which model the exports of this stem belong to, written before the export appears, so
        # that `_prune` in another process never finds an export without it.
        (folder / f"{stem}.source").write_text(str(source.resolve()), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a crash mid-export leaves no half file under the name
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ModelUnavailableError(f"Cannot export {model_path} to ONNX: {type(exc).__name__}: {exc}") from exc
    _prune(folder, path, stem)
    return path


def _prune(folder: Path, keep: Path, stem: str) -> None:
    """Exports no model needs any more: this model's older ones (its weights or our versions
    changed), and those of models whose folder is gone (a deleted model, a test's or a
    benchmark's temporary one) or that name none (written before models were recorded)."""
    for file in folder.glob("*.onnx"):
        owner = file.name.rsplit("-", 1)[0]  # the stem: the key after the last "-" has none
        marker = folder / f"{owner}.source"
        try:
            gone = owner == stem or not Path(marker.read_text(encoding="utf-8")).exists()
        except OSError:
            gone = True
        if file != keep and gone:
            file.unlink(missing_ok=True)
    for marker in folder.glob("*.source"):
        if marker.stem != stem and not any(folder.glob(f"{glob.escape(marker.stem)}-*.onnx")):
            marker.unlink(missing_ok=True)


def _key(folder: Path, graph: str) -> str:
    """What the export depends on besides the model's path: its weights, the exporter's versions
    and which graph of the model it is."""
    import onnxruntime
    import torch

    parts = [torch.__version__, onnxruntime.__version__, str(_OPSET), *([graph] if graph else [])]
    for name in _WEIGHTS:
        if (file := folder / name).is_file():
            stat = file.stat()
            parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return _digest(*parts)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmservice" / "onnx"
