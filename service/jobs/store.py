"""Batch jobs on disk, under BATCH_DIR:

    files/file-<24 hex>.jsonl          a file's content (an upload, or a finished batch's results)
    files/file-<24 hex>.json           its FileObject
    batches/batch_<24 hex>.json        the Batch object (status, counts, timestamps)
    batches/batch_<24 hex>.output.jsonl, .errors.jsonl   results so far, one line per request done

Whole files are written to a temporary name then renamed (a reader or a restart never sees half
of one); results are appended a line at a time, and a restart drops a torn last line, so the
lines on disk are exactly the requests that are done. Ids are looked up in the in-memory index
built from names that match the id pattern: a client's id never becomes a path by itself.

Every method is blocking file work: callers run them off the event loop.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Literal, TypeVar

import msgspec

from kernel.errors import InvalidRequestError
from service.disk import write_atomic
from service.ids import new_id
from service.schemas.batches import Batch, DoneLine, FileObject, InputLine
from service.schemas.common import decode_strict

log = logging.getLogger(__name__)

FILE_ID = re.compile(r"file-[0-9a-f]{24}")
BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")
ResultKind = Literal["output", "errors"]
S = TypeVar("S", bound=msgspec.Struct)
_MAX_REPORTED = 100  # problems listed per file: enough to fix it, bounded for a hostile one


def result_file_id(batch_id: str, kind: ResultKind) -> str:
    """The id a batch's output or error file gets: derived, so finishing twice (after a restart
    mid-way) names the same file."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


class LineProblem(msgspec.Struct):
    line: int  # 1-based
    message: str
    param: str | None = None


def parse_input(
    content: bytes, *, max_lines: int, max_line_bytes: int
) -> tuple[list[tuple[int, InputLine]], list[LineProblem]]:
    """An input file's request lines with their 1-based numbers, and what is wrong with it (at
    most 100 problems). Blank lines are skipped; a custom_id must be unique (results are matched
    to requests by it)."""
    lines: list[tuple[int, InputLine]] = []
    problems: list[LineProblem] = []
    seen: set[str] = set()
    count = 0
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if len(problems) >= _MAX_REPORTED:
            break
        if not raw.strip():
            continue
        count += 1
        if count > max_lines:
            problems.append(LineProblem(number, f"More than {max_lines} requests (BATCH_MAX_LINES)"))
            break
        if len(raw) > max_line_bytes:
            problems.append(
                LineProblem(number, f"Line is {len(raw)} bytes, over {max_line_bytes} (BATCH_MAX_LINE_BYTES)")
            )
            continue
        try:
            line: InputLine = decode_strict(raw, InputLine)  # as an HTTP body: the same messages
        except InvalidRequestError as exc:
            message = exc.message.replace("Invalid request:", "Invalid request line:", 1)
            problems.append(LineProblem(number, message.replace("Malformed JSON body", "Not JSON", 1), exc.param))
            continue
        if not bytes(line.body).lstrip().startswith(b"{"):
            problems.append(LineProblem(number, "body must be a JSON object", "body"))
        elif line.custom_id in seen:
            problems.append(LineProblem(number, f"Duplicate custom_id {line.custom_id[:100]!r}", "custom_id"))
        else:
            seen.add(line.custom_id)
            lines.append((number, line))
    if count == 0 and not problems:
        problems.append(LineProblem(1, "The file holds no requests"))
    return lines, problems


class BatchStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files_dir = root / "files"
        self.batches_dir = root / "batches"
        self.files: dict[str, FileObject] = {}
        self.batches: dict[str, Batch] = {}

    def open(self) -> None:
        """Read what is stored; an unreadable record is logged and skipped. The folders are made
        by the first write, so a server that never runs a batch leaves no trace."""
        for folder in (self.files_dir, self.batches_dir):
            for leftover in folder.glob(".*.tmp"):  # a write cut short by a crash
                leftover.unlink(missing_ok=True)
        for path in self.files_dir.glob("file-*.json"):
            meta = self._read(path, FileObject)
            if (
                meta is not None
                and meta.id == path.stem
                and FILE_ID.fullmatch(meta.id)
                and self.content(meta.id).exists()
            ):
                self.files[meta.id] = meta
        for path in self.batches_dir.glob("batch_*.json"):
            batch = self._read(path, Batch)
            if batch is not None and batch.id == path.stem and BATCH_ID.fullmatch(batch.id):
                self.batches[batch.id] = batch

    @staticmethod
    def _read(path: Path, type_: type[S]) -> S | None:
        try:
            return msgspec.json.decode(path.read_bytes(), type=type_)
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("Batch store: skipping unreadable %s (%s)", path, exc)
            return None

    # -- files ---------------------------------------------------------------------------------
    def content(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"

    def add_file(self, data: bytes, filename: str) -> FileObject:
        meta = FileObject(
            id=new_id("file-"), bytes=len(data), created_at=int(time.time()), filename=filename, purpose="batch"
        )
        write_atomic(self.content(meta.id), data)
        write_atomic(self.files_dir / f"{meta.id}.json", msgspec.json.encode(meta))
        self.files[meta.id] = meta
        return meta

    def delete_file(self, file_id: str) -> None:
        del self.files[file_id]
        (self.files_dir / f"{file_id}.json").unlink(missing_ok=True)  # first: a restart then forgets it
        self.content(file_id).unlink(missing_ok=True)

    def read_file(self, file_id: str) -> bytes:
        return self.content(file_id).read_bytes()

    # -- batches ---------------------------------------------------------------------------------
    def save_batch(self, batch: Batch) -> None:
        write_atomic(self.batches_dir / f"{batch.id}.json", msgspec.json.encode(batch))
        self.batches[batch.id] = batch

    def forget_batch(self, batch_id: str) -> None:
        """Drop a finished batch's record (its output and error files stay, as files)."""
        self.batches.pop(batch_id, None)
        (self.batches_dir / f"{batch_id}.json").unlink(missing_ok=True)
        for kind in ("output", "errors"):
            self._results(batch_id, kind).unlink(missing_ok=True)

    def _results(self, batch_id: str, kind: ResultKind) -> Path:
        return self.batches_dir / f"{batch_id}.{kind}.jsonl"

    def append(self, batch_id: str, kind: ResultKind, line: bytes) -> None:
        """One finished request's line. Flushed, not fsynced: a crash of the process keeps it, a
        power cut may lose the last lines, whose requests then simply run again."""
        with open(self._results(batch_id, kind), "ab") as f:
            f.write(line + b"\n")

    def done(self, batch_id: str, kind: ResultKind) -> list[DoneLine]:
        """The lines written so far; a torn last line (the process died mid-write) is cut off."""
        path = self._results(batch_id, kind)
        if not path.exists():
            return []
        decoder = msgspec.json.Decoder(DoneLine)
        lines: list[DoneLine] = []
        good = 0
        with open(path, "rb") as f:
            for raw in f:
                try:
                    if not raw.endswith(b"\n"):
                        raise msgspec.DecodeError("torn line")
                    lines.append(decoder.decode(raw))
                except msgspec.DecodeError:
                    break
                good += len(raw)
        if good != path.stat().st_size:
            log.warning("Batch %s: dropping a torn result line (its request runs again)", batch_id)
            os.truncate(path, good)
        return lines

    def finish_results(self, batch_id: str, kind: ResultKind) -> str | None:
        """Move the results written so far into a file of their own (purpose batch_output); its id,
        or None when there are none. Safe to repeat after a crash part-way."""
        file_id = result_file_id(batch_id, kind)
        partial, target = self._results(batch_id, kind), self.content(file_id)
        if partial.exists():
            self.files_dir.mkdir(parents=True, exist_ok=True)
            os.replace(partial, target)
        if not target.exists():
            return None
        if file_id not in self.files:
            meta = FileObject(
                id=file_id,
                bytes=target.stat().st_size,
                created_at=int(time.time()),
                filename=f"{batch_id}_{kind}.jsonl",
                purpose="batch_output",
            )
            write_atomic(self.files_dir / f"{file_id}.json", msgspec.json.encode(meta))
            self.files[file_id] = meta
        return file_id


def check_problems(problems: list[LineProblem]) -> None:
    """An upload with problems is refused with the first one, and how many there are."""
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise InvalidRequestError(f"Invalid batch input file, line {first.line}: {first.message}{more}", param="file")
