"""Stored Responses (`store: true`), for `GET`/`DELETE /v1/responses/{id}`, its `input_items` and
`previous_response_id`. One file per response under `<BATCH_DIR>/responses/`:

    resp_<24 hex>.json     {"response": <the Response as answered>, "input": [<its input items>]}

Each record keeps only its own request's input; a continuation walks `previous_response_id` back
to rebuild the conversation, so a long chain costs linear, not quadratic, space. The records live
in memory too (bounded by RESPONSES_MAX_STORED and RESPONSES_MAX_BYTES, oldest evicted first), so a
response is found the moment it is answered; disk writes and deletes run in order on one thread
(a delete never races the write it follows) and survive a restart. Ids are looked up in the
index, never turned into paths from a client's string.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from kernel.errors import NotFoundError
from service.disk import write_atomic

log = logging.getLogger(__name__)

RESPONSE_ID = re.compile(r"resp_[0-9a-f]{24}")
_MAX_CHAIN = 1000  # previous_response_id links followed: bounded even if a record were edited into a loop


class StoredResponse(msgspec.Struct):
    response: dict[str, Any]
    input: list[dict[str, Any]]


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(StoredResponse).decode


class ResponseStore:
    def __init__(self, root: Path, *, max_stored: int, max_bytes: int) -> None:
        self.root = root
        self.max_stored = max_stored
        self.max_bytes = max_bytes
        self._records: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()  # oldest first
        self._bytes = 0
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="response-store")

    def open(self) -> None:
        """Read what is stored (blocking); an unreadable record is logged and skipped. The folder
        is made by the first write, so a server that never stores leaves no trace."""
        found: list[tuple[int, str, StoredResponse, int]] = []  # in the order written: oldest first
        for path in self.root.glob("resp_*.json") if self.root.is_dir() else ():
            if not RESPONSE_ID.fullmatch(path.stem):
                continue
            try:
                data, written = path.read_bytes(), path.stat().st_mtime_ns
                record = _decode(data)
            except (OSError, msgspec.DecodeError) as exc:
                log.warning("Skipping stored response %s: %s", path.name, exc)
                continue
            found.append((written, path.stem, record, len(data)))
        for _, rid, record, size in sorted(found, key=lambda f: (f[0], f[1])):
            self._records[rid] = (record, size)
            self._bytes += size
        for rid in self._evict():
            (self.root / f"{rid}.json").unlink(missing_ok=True)

    def close(self) -> None:
        self._disk.shutdown(wait=True)  # the writes already queued still land

    def __len__(self) -> int:
        return len(self._records)

    @property
    def size(self) -> int:
        return self._bytes

    def get(self, response_id: str) -> StoredResponse:
        entry = self._records.get(response_id)
        if entry is None:
            raise NotFoundError(
                f"No stored response {response_id[:100]!r}: it was never stored (store: false), was deleted,"
                " or was evicted (RESPONSES_MAX_STORED, RESPONSES_MAX_BYTES)",
                param="response_id",
                code="response_not_found",
            )
        return entry[0]

    def context(self, response_id: str) -> list[dict[str, Any]]:
        """The conversation a continuation of `response_id` starts from: every response of the
        chain, oldest first, as its input items then its output items."""
        chain: list[StoredResponse] = []
        rid: str | None = response_id
        while rid is not None and len(chain) < _MAX_CHAIN:
            record = self.get(rid)
            chain.append(record)
            rid = record.response.get("previous_response_id")
        items: list[dict[str, Any]] = []
        for record in reversed(chain):
            items += record.input
            items += record.response.get("output") or []
        return items

    def keep(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> bool:
        """Keep a response (in memory now, on disk in the background); False when it alone is
        over RESPONSES_MAX_BYTES, and then nothing is kept."""
        record = StoredResponse(response, input_items)
        data = _encode(record)
        if len(data) > self.max_bytes:
            log.warning("Response %s is %d bytes, over RESPONSES_MAX_BYTES: not stored", response["id"], len(data))
            return False
        rid = response["id"]
        self._records[rid] = (record, len(data))
        self._bytes += len(data)
        evicted = self._evict()
        self._submit(self._persist, rid, data, evicted)
        return True

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        _, size = self._records.pop(response_id)
        self._bytes -= size
        self._submit(self._persist, None, b"", [response_id])

    async def flush(self) -> None:
        """Wait for the disk work queued so far (tests, shutdown)."""
        await asyncio.wrap_future(self._disk.submit(lambda: None))

    def _evict(self) -> list[str]:
        evicted = []
        while self._records and (len(self._records) > self.max_stored or self._bytes > self.max_bytes):
            rid, (_, size) = self._records.popitem(last=False)
            self._bytes -= size
            evicted.append(rid)
        return evicted

    def _submit(self, fn: Any, *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            except OSError:
                log.exception("Stored responses: disk write failed under %s", self.root)

        self._disk.submit(run)

    def _persist(self, rid: str | None, data: bytes, evicted: list[str]) -> None:
        if rid is not None:
            write_atomic(self.root / f"{rid}.json", data)
        for gone in evicted:
            (self.root / f"{gone}.json").unlink(missing_ok=True)
