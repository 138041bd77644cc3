"""A GGUF file's header, read without its weights: metadata key/values and, when asked, tensor shapes.

The one reader for every layer: the catalogue scan, the memory budget's KV estimate, a llama.cpp
model card before loading and LoRA adapter checks. Arrays (the tokenizer's vocabulary) are skipped,
not decoded: only their length is kept. Every length and count in the file is checked against a
bound and against the bytes the file has left before anything is read, allocated or skipped, so a
truncated download or a hostile file costs at most a short read and a `GgufHeaderError`.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

# A header is small; these bound what a hostile one can make us read, allocate or loop over.
_MAX_STRING = 1 << 20  # a chat template is ~10-50 KB
_MAX_KV = 1 << 16
_MAX_TENSORS = 1 << 20
_MAX_ARRAY = 1 << 26  # the largest vocabularies and merge lists are < 1M entries
_MAX_DIMS = 4  # GGML_MAX_DIMS
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_CHUNK = 1 << 16
# GGUF value types with a fixed size: type id -> struct format.
_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}

Scalar = str | int | float | bool


class GgufHeaderError(ValueError):
    """Not a GGUF file, an unsupported version, a truncated header or an implausible length."""


@dataclass(frozen=True, slots=True)
class GgufHeader:
    meta: dict[str, Scalar]  # scalar and string metadata
    arrays: dict[str, int] = field(default_factory=dict)  # array metadata: its length only
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)  # shapes in ggml order, if asked for


def read_gguf_header(path: str | Path, *, tensors: bool = False) -> GgufHeader:
    """The header of `path`; `tensors`: also every tensor's shape. Raises GgufHeaderError (or OSError)."""
    with open(path, "rb", buffering=1 << 16) as f:
        reader = _Reader(f, os.fstat(f.fileno()).st_size)
        try:
            return reader.header(tensors)
        except GgufHeaderError as exc:
            raise GgufHeaderError(f"{path}: {exc}") from None


def cached_gguf_header(path: str | Path) -> GgufHeader:
    """`read_gguf_header` (metadata only), remembered while the file is the same (inode, size,
    mtime): a first use's catalogue scan, model card and memory estimate read the header once.
    The result is shared: read it, never change it."""
    st = os.stat(path)
    return _remembered(os.path.realpath(path), (st.st_ino, st.st_size, st.st_mtime_ns))


# Keyed by the file's identity, so a changed file is read afresh; a handful of models at most.
@functools.lru_cache(maxsize=64)
def _remembered(path: str, identity: tuple[int, int, int]) -> GgufHeader:
    return read_gguf_header(path)


class _Reader:
    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f, self._size = f, size

    def header(self, with_tensors: bool) -> GgufHeader:
        if self._f.read(4) != b"GGUF":
            raise GgufHeaderError("not a GGUF file")
        version = self._unpack("<I")
        if version < 2:
            raise GgufHeaderError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        # Each key/value takes at least 12 bytes, each tensor entry at least 24: a count the file
        # cannot hold is refused before looping over it.
        if n_kv > _MAX_KV or n_kv * 12 > self._left():
            raise GgufHeaderError(f"implausible metadata count {n_kv}")
        if n_tensors > _MAX_TENSORS:
            raise GgufHeaderError(f"implausible tensor count {n_tensors}")
        meta: dict[str, Scalar] = {}
        arrays: dict[str, int] = {}
        for _ in range(n_kv):
            key = self._string()
            vtype = self._unpack("<I")
            if vtype == _ARRAY:
                arrays[key] = self._skip_array()
            else:
                meta[key] = self._value(vtype)
        shapes: dict[str, tuple[int, ...]] = {}
        if with_tensors:
            if n_tensors * 24 > self._left():
                raise GgufHeaderError(f"implausible tensor count {n_tensors}")
            for _ in range(n_tensors):
                name = self._string()
                n_dims = self._unpack("<I")
                if n_dims > _MAX_DIMS:
                    raise GgufHeaderError(f"tensor {name!r} has {n_dims} dimensions")
                shapes[name] = tuple(self._unpack("<Q") for _ in range(n_dims))
                self._skip(12)  # type and data offset
        return GgufHeader(meta, arrays, shapes)

    def _left(self) -> int:
        return self._size - self._f.tell()

    def _take(self, n: int) -> bytes:
        if n > self._left():
            raise GgufHeaderError("the file ends inside its header")
        return self._f.read(n)

    def _skip(self, n: int) -> None:
        if n > self._left():
            raise GgufHeaderError("the file ends inside its header")
        self._f.seek(n, os.SEEK_CUR)

    def _unpack(self, fmt: str) -> int:
        value: int = struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]
        return value

    def _string_length(self) -> int:
        n = self._unpack("<Q")
        if n > _MAX_STRING:
            raise GgufHeaderError(f"a header string of {n} bytes")
        return n

    def _string(self) -> str:
        return self._take(self._string_length()).decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Scalar:
        if vtype == _STRING:
            return self._string()
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise GgufHeaderError(f"unknown value type {vtype}")
        value: Scalar = struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]
        return value

    def _skip_array(self) -> int:
        itype, count = self._unpack("<I"), self._unpack("<Q")
        if itype == _STRING:
            if count > _MAX_ARRAY or count * 8 > self._left():
                raise GgufHeaderError(f"implausible array length {count}")
            self._skip_strings(count)
        elif itype in _SCALARS:
            width = struct.calcsize(_SCALARS[itype])
            if count > _MAX_ARRAY:
                raise GgufHeaderError(f"implausible array length {count}")
            self._skip(width * count)
        else:  # llama.cpp refuses nested arrays too
            raise GgufHeaderError(f"unsupported array item type {itype}")
        return count

    def _skip_strings(self, count: int) -> None:
        """Skip `count` strings, walking their lengths in buffered chunks (a 262k-token vocabulary
        one struct call at a time through the file object costs seconds; in memory ~0.1 s)."""
        f, length = self._f, _U64.unpack_from
        buf, pos = b"", 0
        for _ in range(count):
            if pos + 8 > len(buf):
                if pos > len(buf):  # the last string ran past the chunk: skip the rest of it
                    self._skip(pos - len(buf))
                    buf, pos = b"", 0
                buf, pos = buf[pos:] + f.read(_CHUNK), 0
                if len(buf) < 8:
                    raise GgufHeaderError("the file ends inside its header")
            (n,) = length(buf, pos)
            if n > _MAX_STRING:
                raise GgufHeaderError(f"a header string of {n} bytes")
            pos += 8 + n
        # Give back what was read past the array (or skip what is left of its last string).
        if pos > len(buf):
            self._skip(pos - len(buf))
        else:
            f.seek(pos - len(buf), os.SEEK_CUR)
