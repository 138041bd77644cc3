"""The one GGUF header reader (kernel.gguf): what it reads, and hostile headers refused cheaply."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kernel.gguf import GgufHeaderError, read_gguf_header
from service.tiers.catalogue import scan
from tests.unit.test_catalogue import write_gguf

U32, U64, STRING, ARRAY = 4, 10, 8, 9


def _s(text: str, length: int | None = None) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data) if length is None else length) + data


def _header(*kvs: bytes, n_kv: int | None = None, n_tensors: int = 0, tail: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + tail


def _kv_string(key: str, value: str, length: int | None = None) -> bytes:
    return _s(key) + struct.pack("<I", STRING) + _s(value, length)


def _kv_array(key: str, item: int, count: int, payload: bytes = b"") -> bytes:
    return _s(key) + struct.pack("<IIQ", ARRAY, item, count) + payload


ARCH = _kv_string("general.architecture", "llama")

HOSTILE = {
    "huge string length": _header(ARCH, _kv_string("general.name", "x", length=1 << 40)),
    "string length past 64 bits of memory": _header(ARCH, _kv_string("general.name", "x", length=(1 << 64) - 1)),
    "huge key length": _header(_s("k", length=1 << 62)),
    "absurd metadata count": _header(ARCH, n_kv=1 << 60),
    "absurd fixed array": _header(ARCH, _kv_array("tokenizer.ggml.scores", U32, 1 << 60)),
    "absurd string array": _header(ARCH, _kv_array("tokenizer.ggml.tokens", STRING, 1 << 50, _s("a") * 4)),
    "array string past the end": _header(ARCH, _kv_array("tokens", STRING, 2, _s("a") + _s("b", 1 << 30))),
    "nested arrays": _header(ARCH, _kv_array("a", ARRAY, 1, struct.pack("<IQ", U32, 0))),
    "unknown value type": _header(ARCH, _s("k") + struct.pack("<I", 99) + b"\0" * 8),
    "version 1": b"GGUF" + struct.pack("<IQQ", 1, 0, 0),
    "not a GGUF": b"GGML" + b"\0" * 64,
    "empty": b"",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_headers_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(HOSTILE[name])
    with pytest.raises(GgufHeaderError):
        read_gguf_header(path, tensors=True)


def test_absurd_tensor_entries_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(_header(ARCH, n_tensors=1 << 40))
    with pytest.raises(GgufHeaderError, match="tensor count"):
        read_gguf_header(path)
    path.write_bytes(_header(ARCH, n_tensors=1 << 19))  # plausible, but more than the file holds
    assert read_gguf_header(path).meta["general.architecture"] == "llama"  # metadata alone is fine
    with pytest.raises(GgufHeaderError, match="tensor count"):
        read_gguf_header(path, tensors=True)
    path.write_bytes(_header(ARCH, n_tensors=1, tail=_s("t") + struct.pack("<I", 9) + b"\0" * 100))
    with pytest.raises(GgufHeaderError, match="dimensions"):
        read_gguf_header(path, tensors=True)


def test_a_file_cut_anywhere_in_its_header_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.gguf"
    write_gguf(good, arch="qwen2", ctx=4096)
    data = good.read_bytes()
    full = read_gguf_header(good, tensors=True)
    assert full.meta["qwen2.context_length"] == 4096 and full.tensors == {"t": (4,)}
    cut = tmp_path / "cut.gguf"
    for end in range(0, 200, 7):  # the header of this file is ~200 bytes
        cut.write_bytes(data[:end])
        with pytest.raises(GgufHeaderError):
            read_gguf_header(cut, tensors=True)


def test_the_catalogue_lists_what_is_sound_beside_hostile_files(tmp_path: Path) -> None:
    write_gguf(tmp_path / "good.gguf")
    for i, data in enumerate(HOSTILE.values()):
        (tmp_path / f"hostile-{i}.gguf").write_bytes(data)
    assert list(scan(tmp_path)) == ["good"]


def test_a_first_use_reads_the_header_once_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalogue scan, the memory estimate (and a llama.cpp card) of one model share one read."""
    import kernel.gguf
    from kernel.config import TierSettings
    from service.tiers.budget import estimate_bytes

    reads: list[str] = []
    real = kernel.gguf.read_gguf_header

    def counted(path: str | Path, *, tensors: bool = False) -> kernel.gguf.GgufHeader:
        reads.append(str(path))
        return real(path, tensors=tensors)

    monkeypatch.setattr(kernel.gguf, "read_gguf_header", counted)
    model = tmp_path / "m.gguf"
    write_gguf(model, ctx=1024)
    assert list(scan(tmp_path)) == ["m"]
    assert estimate_bytes(TierSettings(), str(model)) is not None
    assert kernel.gguf.cached_gguf_header(model).meta["llama.context_length"] == 1024
    assert len(reads) == 1
    write_gguf(model, ctx=2048)  # a new file (size or mtime): read again
    assert kernel.gguf.cached_gguf_header(model).meta["llama.context_length"] == 2048
    assert len(reads) == 2
