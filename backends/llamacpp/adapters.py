"""LoRA adapters for the llama.cpp engine: GGUF LoRA files, checked, loaded and set on the context.

llama.cpp applies adapters to a whole context (`llama_set_adapters_lora`), not per sequence, so
sequences with different adapters never share a decode step: `batch` decodes one adapter
group per step, taking turns. Changing the context's adapters costs a graph re-reserve (~10 ms on
a CPU), which is why a group keeps its turn for a few steps.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import llama_cpp

from backends.base import AdapterInfo
from kernel.errors import InvalidRequestError, ModelUnavailableError

# A header is small; these bounds keep a hostile file from making us read or allocate much.
_MAX_STRING = 1 << 20
_MAX_ITEMS = 1 << 20
_MAX_DIMS = 8
# GGUF value types: fixed sizes by type id (8 = string, 9 = array).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_SCALAR = {4: "<I", 5: "<i", 6: "<f", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True, slots=True)
class LoraHeader:
    """What a LoRA GGUF says about itself, read before llama.cpp is given the file."""

    kind: str  # general.type: "adapter" for adapters
    adapter_type: str  # adapter.type: "lora"
    architecture: str
    rank: int | None  # from the first `*.lora_a` tensor's shape
    alpha: float | None


@dataclass(frozen=True, slots=True)
class GgufHeader:
    meta: dict[str, str | float | int]  # scalar and string metadata (arrays skipped)
    tensors: dict[str, tuple[int, ...]]  # every tensor's shape, in ggml order


def read_gguf_header(path: str) -> GgufHeader:
    """Parse a GGUF file's header (metadata and tensor shapes, not the weights)."""
    try:
        with open(path, "rb") as f:
            return _parse(f)
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequestError(f"Not a readable GGUF file: {exc}", param="path", code="invalid_adapter") from exc


def read_lora_header(path: str) -> LoraHeader:
    header = read_gguf_header(path)
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


def _parse(f: BinaryIO) -> GgufHeader:
    if f.read(4) != b"GGUF":
        raise ValueError("no GGUF magic number")
    (version,) = _unpack(f, "<I")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    n_tensors, n_kv = _unpack(f, "<QQ")
    if n_tensors > _MAX_ITEMS or n_kv > _MAX_ITEMS:
        raise ValueError("implausible tensor or metadata count")
    meta: dict[str, str | float | int] = {}
    for _ in range(n_kv):
        key = _string(f)
        (kind,) = _unpack(f, "<I")
        value = _value(f, kind)
        if value is not None:
            meta[key] = value
    tensors: dict[str, tuple[int, ...]] = {}
    for _ in range(n_tensors):
        name = _string(f)
        (n_dims,) = _unpack(f, "<I")
        if n_dims > _MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        tensors[name] = tuple(int(d) for d in _unpack(f, f"<{n_dims}Q"))
        _unpack(f, "<IQ")  # type and data offset
    return GgufHeader(meta, tensors)


def _unpack(f: BinaryIO, fmt: str) -> tuple[Any, ...]:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside its header")
    return struct.unpack(fmt, data)


def _string(f: BinaryIO) -> str:
    (n,) = _unpack(f, "<Q")
    if n > _MAX_STRING:
        raise ValueError("a header string is implausibly long")
    data = f.read(n)
    if len(data) != n:
        raise ValueError("the file ends inside its header")
    return data.decode("utf-8")


def _value(f: BinaryIO, kind: int) -> str | float | int | None:
    """A scalar or string value; arrays are skipped (None)."""
    if kind == 8:
        return _string(f)
    if kind in _SCALAR:
        value: float | int = _unpack(f, _SCALAR[kind])[0]
        return value
    if kind in _FIXED:
        f.read(_FIXED[kind])
        return None
    if kind != 9:
        raise ValueError(f"unknown metadata type {kind}")
    item, n = _unpack(f, "<IQ")
    if n > _MAX_ITEMS * 64:
        raise ValueError("a metadata array is implausibly long")
    if item in _FIXED:
        f.seek(_FIXED[item] * n, os.SEEK_CUR)
        return None
    if item == 9:
        raise ValueError("nested metadata arrays")
    for _ in range(n):
        _value(f, item)
    return None


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
