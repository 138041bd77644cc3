"""A prompt cache that outlives its KV slot: engine states of token prefixes in a byte-budgeted
RAM tier and, optionally, a disk tier that survives a restart.

An engine puts in the state of a prefix it is about to lose (a slot taken by another
conversation, a conversation leaving MLX's prefix cache) and asks for the longest cached prefix
of a new prompt. Each entry is a token list and the engine's state for it, which the RAM tier
holds as the engine made it and a `StateCodec` turns into blobs for the disk (llama.cpp: a
sequence's state and its context checkpoints, bytes already; MLX: its cache arrays, written by
the writer thread). Both tiers are LRU within their byte budgets. Every entry put in RAM is also
written to disk (by a writer thread, never the decode thread; temp file + rename), so a
restart or a RAM eviction loses nothing the disk budget can keep.

A disk file: `MAGIC`, a 4-byte header length, a JSON header (format version, the model
identity, the blob sizes, the payload's SHA-256), then the payload: the tokens (int32) and the
blobs. On start the index is rebuilt from the headers; a file that is unreadable, truncated, of
another format or of another model is ignored with a warning, and its checksum is checked when
it is read for a hit (a mismatch is a miss and a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from backends.base import common_prefix

log = logging.getLogger(__name__)

MAGIC = b"LLMSPC\x00\x01"
FORMAT_VERSION = 1
SUFFIX = ".prompt"
_LEN = struct.Struct("<I")


S = TypeVar("S")


class StateCodec(Protocol[S]):
    """How an engine's state is counted against the RAM budget and turned into disk blobs and back."""

    def nbytes(self, state: S) -> int: ...

    def dump(self, state: S) -> list[bytes]:
        """The blobs to write; runs on the writer thread."""
        ...

    def load(self, blobs: list[bytes]) -> S:
        """The state from a file's blobs (checksum already checked); ValueError if they make none."""
        ...


class BlobCodec:
    """States that are bytes already (llama.cpp's sequence states)."""

    def nbytes(self, state: list[bytes]) -> int:
        return sum(len(b) for b in state)

    def dump(self, state: list[bytes]) -> list[bytes]:
        return state

    def load(self, blobs: list[bytes]) -> list[bytes]:
        return blobs


@dataclass(slots=True, eq=False)
class CachedPrompt(Generic[S]):
    """A token prefix and the engine's state after it (`state` None: only on disk, not read)."""

    key: str
    tokens: tuple[int, ...]
    state: S | None
    size: int
    meta: list[int] = field(default_factory=list)  # engine numbers (llama.cpp: checkpoint positions)


@dataclass(slots=True)
class TierCounts:
    hits: int = 0
    evictions: int = 0


class StateStore(Generic[S]):
    """The RAM and disk tiers of one engine instance; `identity` names the model (and whatever
    else makes a state unusable elsewhere), so that files of another model are never restored."""

    def __init__(
        self, identity: str, codec: StateCodec[S], ram_bytes: int, disk_dir: str = "", disk_bytes: int = 0
    ) -> None:
        self.identity = identity
        self._codec = codec
        self.ram_budget = ram_bytes
        self.disk_budget = disk_bytes if disk_dir else 0
        self._ram: OrderedDict[str, CachedPrompt[S]] = OrderedDict()
        self._ram_bytes = 0
        self._disk: OrderedDict[str, CachedPrompt[S]] = OrderedDict()  # state None; oldest first
        self._disk_bytes = 0
        self._dir = Path(disk_dir) if disk_dir else None
        self._lock = threading.Lock()  # the index is shared with the writer thread
        self.ram = TierCounts()
        self.disk = TierCounts()
        self.misses = 0
        self._queue: queue.Queue[CachedPrompt[S] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        if self._dir is not None and self.disk_budget > 0:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._scan()
            self._writer = threading.Thread(target=self._write_loop, name="prompt-cache-writer", daemon=True)
            self._writer.start()

    @property
    def enabled(self) -> bool:
        return self.ram_budget > 0 or self.disk_budget > 0

    def key(self, tokens: tuple[int, ...]) -> str:
        digest = hashlib.sha256(self.identity.encode())
        digest.update(np.asarray(tokens, dtype=np.int32).tobytes())
        return digest.hexdigest()[:40]

    # -- lookup ----------------------------------------------------------------------------

    def longest(self, prompt: list[int], limit: int) -> tuple[CachedPrompt[S] | None, int]:
        """The entry sharing most of `prompt` (at most `limit` tokens) and that length; RAM first
        among equals. Not counted as a hit until `take` reads it."""
        best: CachedPrompt[S] | None = None
        n = 0
        with self._lock:
            for entry in [*self._ram.values(), *self._disk.values()]:
                m = min(common_prefix(entry.tokens, prompt), limit)
                if m > n:
                    best, n = entry, m
        return best, n

    def take(self, entry: CachedPrompt[S]) -> S | None:
        """The state of `entry` (read from disk if need be, then kept in RAM), or None if lost."""
        with self._lock:
            if entry.key in self._ram:
                self._ram.move_to_end(entry.key)
                self.ram.hits += 1
                return self._ram[entry.key].state
        state = self._read(entry)
        with self._lock:
            if state is None:
                self._forget_disk(entry.key)
                return None
            self.disk.hits += 1
            if entry.key in self._disk:
                self._disk.move_to_end(entry.key)
            size = self._codec.nbytes(state) + 4 * len(entry.tokens)
            self._put_ram(CachedPrompt(entry.key, entry.tokens, state, size, list(entry.meta)))
        return state

    def miss(self) -> None:
        self.misses += 1

    # -- insertion ---------------------------------------------------------------------------

    def put(self, tokens: tuple[int, ...], state: S, meta: list[int]) -> None:
        """Keep `state`, the engine's state after `tokens`, in RAM and (queued) on disk."""
        size = self._codec.nbytes(state) + 4 * len(tokens)
        entry = CachedPrompt(self.key(tokens), tokens, state, size, meta)
        with self._lock:
            self._put_ram(entry)
            on_disk = entry.key in self._disk
        if self._writer is not None and not on_disk and size <= self.disk_budget:
            self._queue.put(entry)

    def holds(self, tokens: tuple[int, ...]) -> bool:
        key = self.key(tokens)
        with self._lock:
            return key in self._ram or key in self._disk

    def _put_ram(self, entry: CachedPrompt[S]) -> None:
        if entry.size > self.ram_budget:
            return
        old = self._ram.pop(entry.key, None)
        if old is not None:
            self._ram_bytes -= old.size
        self._ram[entry.key] = entry
        self._ram_bytes += entry.size
        while self._ram_bytes > self.ram_budget:
            _, gone = self._ram.popitem(last=False)
            self._ram_bytes -= gone.size
            self.ram.evictions += 1

    # -- the disk tier -------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        assert self._dir is not None
        return self._dir / f"{key}{SUFFIX}"

    def _write_loop(self) -> None:
        while (entry := self._queue.get()) is not None:
            try:
                self._write(entry)
            except (OSError, ValueError) as exc:
                log.warning("Prompt cache: could not write %s: %s", self._path(entry.key), exc)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _write(self, entry: CachedPrompt[S]) -> None:
        assert entry.state is not None
        blobs = self._codec.dump(entry.state)
        tokens = np.asarray(entry.tokens, dtype=np.int32).tobytes()
        digest = hashlib.sha256(tokens)
        for blob in blobs:
            digest.update(blob)
        header = json.dumps(
            {
                "version": FORMAT_VERSION,
                "model": self.identity,
                "tokens": len(entry.tokens),
                "blobs": [len(b) for b in blobs],
                "meta": entry.meta,
                "sha256": digest.hexdigest(),
            }
        ).encode()
        path = self._path(entry.key)
        size = len(MAGIC) + _LEN.size + len(header) + len(tokens) + sum(len(b) for b in blobs)
        with self._lock:
            if entry.key in self._disk or size > self.disk_budget:
                return
            # Room first: the files on disk never exceed the budget, not even while this one is written.
            while self._disk and self._disk_bytes + size > self.disk_budget:
                old_key = next(iter(self._disk))
                self._forget_disk(old_key)
                self.disk.evictions += 1
                self._path(old_key).unlink(missing_ok=True)
            self._disk_bytes += size  # reserved
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(MAGIC + _LEN.pack(len(header)) + header + tokens)
                for blob in blobs:
                    f.write(blob)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            with self._lock:
                self._disk_bytes -= size
            raise
        with self._lock:
            self._disk[entry.key] = CachedPrompt(entry.key, entry.tokens, None, size, list(entry.meta))

    def _forget_disk(self, key: str) -> None:
        gone = self._disk.pop(key, None)
        if gone is not None:
            self._disk_bytes -= gone.size

    def _header(self, path: Path) -> tuple[dict[str, Any], tuple[int, ...], int]:
        """A file's header, tokens and the offset of its first blob; ValueError if it is not ours."""
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + _LEN.size)
            if len(head) < len(MAGIC) + _LEN.size or not head.startswith(MAGIC):
                raise ValueError("not a prompt cache file")
            (length,) = _LEN.unpack(head[len(MAGIC) :])
            header = json.loads(f.read(length))
            if not isinstance(header, dict) or header.get("version") != FORMAT_VERSION:
                raise ValueError("another format version")
            if header.get("model") != self.identity:
                raise ValueError("another model")
            n = int(header["tokens"])
            raw = f.read(4 * n)
            if len(raw) != 4 * n:
                raise ValueError("truncated")
            offset = len(head) + length + 4 * n
        total = offset + sum(int(b) for b in header["blobs"])
        if path.stat().st_size != total:
            raise ValueError(f"{path.stat().st_size} bytes where the header says {total}")
        return header, tuple(np.frombuffer(raw, dtype=np.int32).tolist()), offset

    def _scan(self) -> None:
        assert self._dir is not None
        found: list[tuple[float, CachedPrompt[S]]] = []
        for path in self._dir.glob(f"*{SUFFIX}"):
            try:
                header, tokens, _ = self._header(path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("Prompt cache: ignoring %s (%s)", path, exc)
                continue
            stat = path.stat()
            meta = [int(m) for m in header.get("meta", [])]
            found.append((stat.st_mtime, CachedPrompt(path.stem, tokens, None, stat.st_size, meta)))
        for _, entry in sorted(found, key=lambda f: f[0]):  # oldest first: the LRU order
            self._disk[entry.key] = entry
            self._disk_bytes += entry.size
        while self._disk_bytes > self.disk_budget and self._disk:  # a lowered budget
            old_key = next(iter(self._disk))
            self._forget_disk(old_key)
            self.disk.evictions += 1
            self._path(old_key).unlink(missing_ok=True)

    def _read(self, entry: CachedPrompt[S]) -> S | None:
        path = self._path(entry.key)
        try:
            header, _, offset = self._header(path)
            with open(path, "rb") as f:
                f.seek(offset - 4 * len(entry.tokens))
                tokens = f.read(4 * len(entry.tokens))
                digest = hashlib.sha256(tokens)
                blobs = []
                for size in header["blobs"]:
                    blob = f.read(int(size))
                    digest.update(blob)
                    blobs.append(blob)
            if digest.hexdigest() != header["sha256"]:
                raise ValueError("checksum mismatch")
            state = self._codec.load(blobs)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Prompt cache: ignoring %s (%s)", path, exc)
            return None
        os.utime(path)  # the LRU order survives a restart
        return state

    # -- operator -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Wait until every queued entry is on disk."""
        if self._writer is not None:
            self._queue.join()

    def clear(self) -> None:
        """Empty both tiers (files included)."""
        self.flush()
        with self._lock:
            self._ram.clear()
            self._ram_bytes = 0
            for key in list(self._disk):
                self._path(key).unlink(missing_ok=True)
            self._disk.clear()
            self._disk_bytes = 0

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "misses": self.misses,
                "ram": {
                    "hits": self.ram.hits,
                    "evictions": self.ram.evictions,
                    "entries": len(self._ram),
                    "bytes": self._ram_bytes,
                    "budget_bytes": self.ram_budget,
                },
                "disk": {
                    "hits": self.disk.hits,
                    "evictions": self.disk.evictions,
                    "entries": len(self._disk),
                    "bytes": self._disk_bytes,
                    "budget_bytes": self.disk_budget,
                },
            }


class PromptCache(StateStore[list[bytes]]):
    """A store of states that are byte strings already (llama.cpp's)."""

    def __init__(self, identity: str, ram_bytes: int, disk_dir: str = "", disk_bytes: int = 0) -> None:
        super().__init__(identity, BlobCodec(), ram_bytes, disk_dir, disk_bytes)
