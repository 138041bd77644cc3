"""The batch store alone: input parsing, results that survive a torn write, finishing twice."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from service.jobs.store import BatchStore, parse_input, result_file_id
from service.schemas.batches import Batch


def _line(custom_id: str, url: str = "/v1/chat/completions") -> bytes:
    body = {"model": "light", "messages": []}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()


def test_parse_input_numbers_lines_and_reports_problems() -> None:
    content = b"\n".join([_line("a"), b"", _line("b"), b"{oops", _line("a"), b'{"custom_id": "c"}'])
    lines, problems = parse_input(content, max_lines=10, max_line_bytes=1000)
    assert [(number, line.custom_id) for number, line in lines] == [(1, "a"), (3, "b")]
    assert [(p.line, p.param) for p in problems] == [(4, None), (5, "custom_id"), (6, None)]
    assert "missing required field" in problems[2].message
    _, too_many = parse_input(b"\n".join(_line(str(i)) for i in range(5)), max_lines=3, max_line_bytes=1000)
    assert [p.line for p in too_many] == [4]
    _, too_long = parse_input(_line("x"), max_lines=3, max_line_bytes=10)
    assert "BATCH_MAX_LINE_BYTES" in too_long[0].message
    _, hostile = parse_input(b"[" * 100_000 + b"\n" + b"{}\n" * 500, max_lines=10**6, max_line_bytes=10**6)
    assert len(hostile) == 100  # reported problems are bounded


def test_results_survive_a_torn_write_and_finishing_twice(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    store.open()
    assert not tmp_path.joinpath("files").exists()  # nothing written, nothing made
    batch = Batch(
        id="batch_" + "0" * 24,
        endpoint="/v1/embeddings",
        input_file_id="file-x",
        completion_window="24h",
        status="in_progress",
        created_at=1,
        expires_at=2,
    )
    store.save_batch(batch)
    store.append(batch.id, "output", b'{"custom_id": "a", "response": {"body": {"usage": {"prompt_tokens": 3}}}}')
    with open(tmp_path / "batches" / f"{batch.id}.output.jsonl", "ab") as f:
        f.write(b'{"custom_id": "b", "resp')
    done = store.done(batch.id, "output")
    assert [(d.custom_id, d.usage()) for d in done] == [("a", (3, 0, 0))]
    assert store.done(batch.id, "output") == done  # the torn line was cut off for good
    store.append(batch.id, "output", b'{"custom_id": "b"}')

    reopened = BatchStore(tmp_path)
    reopened.open()
    assert reopened.batches[batch.id] == batch
    first = reopened.finish_results(batch.id, "output")
    assert first == result_file_id(batch.id, "output")
    assert reopened.finish_results(batch.id, "output") == first  # repeated after a crash: same file
    assert reopened.finish_results(batch.id, "errors") is None
    assert reopened.read_file(first).count(b"\n") == 2
    again = BatchStore(tmp_path)
    again.open()
    assert again.files[first].purpose == "batch_output"


def test_unreadable_or_misnamed_records_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "batches").mkdir(parents=True)
    (tmp_path / "batches" / ("batch_" + "1" * 24 + ".json")).write_bytes(b"{not json")
    (tmp_path / "files").mkdir()
    meta = {"id": "file-../../x", "bytes": 1, "created_at": 1, "filename": "x", "purpose": "batch"}
    (tmp_path / "files" / ("file-" + "2" * 24 + ".json")).write_bytes(msgspec.json.encode(meta))
    store = BatchStore(tmp_path)
    store.open()
    assert store.batches == {} and store.files == {}
