"""LoRA adapters for the llama.cpp engine: GGUF LoRA files, checked, loaded and set on the context.

llama.cpp applies adapters to a whole context (`llama_set_adapters_lora`), not per sequence, so
sequences with different adapters never share a decode step: `batch` decodes one adapter
group per step, taking turns. Changing the context's adapters costs a graph re-reserve (~10 ms on
a CPU), which is why a group keeps its turn for a few steps.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

import llama_cpp

from backends.base import AdapterInfo
from kernel.errors import InvalidRequestError, ModelUnavailableError
from kernel.gguf import GgufHeaderError, read_gguf_header


@dataclass(frozen=True, slots=True)
class LoraHeader:
    """What a LoRA GGUF says about itself, read before llama.cpp is given the file."""

    kind: str  # general.type: "adapter" for adapters
    adapter_type: str  # adapter.type: "lora"
    architecture: str
    rank: int | None  # from the first `*.lora_a` tensor's shape
    alpha: float | None


def read_lora_header(path: str) -> LoraHeader:
    try:
        header = read_gguf_header(path, tensors=True)
    except (OSError, GgufHeaderError) as exc:
        raise InvalidRequestError(f"Not a readable GGUF file: {exc}", param="path", code="invalid_adapter") from exc
    meta = header.meta
    # The rank is the second ggml dimension, (inputs, rank), of the first `*.lora_a` tensor.
    rank = next((dims[1] for name, dims in header.tensors.items() if name.endswith(".lora_a") and len(dims) >= 2), None)
    alpha = meta.get("adapter.lora.alpha")
    return LoraHeader(
        kind=str(meta.get("general.type", "")),
        adapter_type=str(meta.get("adapter.type", "")),
        architecture=str(meta.get("general.architecture", "")),
        rank=rank,
        alpha=float(alpha) if isinstance(alpha, int | float) else None,
    )


@dataclass(slots=True)
class _Loaded:
    pointer: Any
    info: AdapterInfo


class LoraAdapters:
    """The adapters loaded for one model, and which one its context has set."""

    def __init__(self, model: Any, architecture: str) -> None:
        self._model = model
        self._architecture = architecture
        self._loaded: dict[str, _Loaded] = {}
        self._current: str | None = None

    def names(self) -> list[str]:
        return sorted(self._loaded)

    def load(self, name: str, path: str) -> AdapterInfo:
        if name in self._loaded:
            raise InvalidRequestError(f"Adapter {name} is already loaded", param="adapter", code="adapter_exists")
        if not os.path.isfile(path):
            raise InvalidRequestError(f"Adapter file not found: {path}", param="path", code="invalid_adapter")
        header = read_lora_header(path)
        if header.kind != "adapter" or header.adapter_type != "lora":
            raise InvalidRequestError(
                f"{path} is not a LoRA adapter GGUF "
                f"(general.type={header.kind!r}, adapter.type={header.adapter_type!r})",
                param="path",
                code="invalid_adapter",
            )
        if header.architecture != self._architecture:
            raise InvalidRequestError(
                f"Adapter {name} is for {header.architecture!r} models; this model is {self._architecture!r}",
                param="path",
                code="invalid_adapter",
            )
        pointer = llama_cpp.llama_adapter_lora_init(self._model, path.encode("utf-8"))
        if not pointer:  # llama.cpp logged why (tensor shapes that do not match the model, ...)
            raise InvalidRequestError(
                f"llama.cpp could not load adapter {name} from {path} (it does not fit this model; see the log)",
                param="path",
                code="invalid_adapter",
            )
        info = AdapterInfo(name, path, os.path.getsize(path), header.rank)
        self._loaded[name] = _Loaded(pointer, info)
        return info

    def unload(self, context: Any, name: str) -> None:
        loaded = self._loaded.pop(name, None)
        if loaded is None:
            return
        if self._current == name:  # never leave the context pointing at freed weights
            self.apply(context, None)
        llama_cpp.llama_adapter_lora_free(loaded.pointer)

    def has(self, name: str) -> bool:
        return name in self._loaded

    def apply(self, context: Any, name: str | None) -> None:
        """Set `name` (None: no adapter) on the context, if it is not set already."""
        if name == self._current:
            return
        if name is None:
            rc = llama_cpp.llama_set_adapters_lora(context, None, 0, None)
        else:
            loaded = self._loaded.get(name)
            if loaded is None:
                raise ModelUnavailableError(f"Adapter {name} was unloaded")
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(loaded.pointer)
            scales = (ctypes.c_float * 1)(1.0)  # alpha / rank is applied by llama.cpp itself
            rc = llama_cpp.llama_set_adapters_lora(context, adapters, 1, scales)
        if rc != 0:
            raise ModelUnavailableError(f"llama.cpp could not set adapter {name} (status {rc})")
        self._current = name

    def forget(self) -> None:
        """The model is being freed, and with it every adapter."""
        self._loaded.clear()
        self._current = None
