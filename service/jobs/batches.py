"""Batch jobs (OpenAI's Files + Batch API): JSONL files of requests run in the background.

Lifecycle: validating (the input file is read and every line's url checked against the batch's
endpoint) → in_progress (lines run; request_counts move as each finishes) → finalizing (results
become an output file and an error file) → completed. A file that fails validation makes the
batch `failed` with `errors`; `cancel` moves it to cancelling, stops its running lines, and it
ends `cancelled` with the results so far; one still running 24 h after creation ends `expired`
(the lines left become error lines).

Each line goes down the same path as its HTTP request: decoded strictly like an HTTP body, then
`serve_chat` / `serve_completion` / `Embeddings.create`, errors mapped by the app's one mapper
into the same envelope; a line's error becomes a line of the error file, never the batch's.

Priority: batch lines are background work, three ways.
  1. Per tier, at most BATCH_CONCURRENCY lines (of every batch together) are in flight.
  2. A line is handed to a tier only when no interactive request waits in that tier's queue.
  3. The tier's queue serves interactive jobs first (service/tiers/workers.py, service/tiers/micro_batcher.py), so
     one that arrives after a line was handed over still goes ahead of it.
A line already generating is not pre-empted: with continuous batching (MAX_BATCH > BATCH_CONCURRENCY)
an interactive request joins the running decode at the next step; with MAX_BATCH=1 it waits for
at most the lines already running.

Restart: every line's result is appended to disk as it finishes, so a server that stops mid-batch
resumes it at start, running only the lines with no result yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec

from kernel.errors import InvalidRequestError, LLMServiceError, NotFoundError, RateLimitError
from service.ids import new_id
from service.jobs.store import BATCH_ID, FILE_ID, BatchStore, LineProblem, check_problems, parse_input
from service.metrics import RequestRecord
from service.schemas.batches import (
    FINISHED,
    Batch,
    BatchCreate,
    BatchError,
    BatchErrors,
    BatchList,
    BatchStatus,
    BatchUsage,
    FileDeleted,
    FileList,
    FileObject,
    InputLine,
    LineError,
    LineResponse,
    OutputLine,
    RequestCounts,
)
from service.schemas.chat import ChatCompletion, ChatCompletionRequest
from service.schemas.common import decode_strict
from service.schemas.completions import Completion, CompletionRequest
from service.schemas.embeddings import EmbeddingCreate, EmbeddingList
from service.serving.chat import serve_chat, serve_completion
from service.serving.embeddings import Embeddings
from service.serving.generation import Generation
from service.serving.streaming import Streamed
from service.settings import Settings
from service.tiers.registry import Registry
from service.tiers.slots import TierSlot, TierState

log = logging.getLogger(__name__)

ErrorMapper = Callable[[Exception], LLMServiceError]
_WINDOW_SECONDS = 24 * 3600  # completion_window "24h", the only one OpenAI offers
_POLL_SECONDS = 0.02  # how often a held-back line looks again for a quiet queue
_encode = msgspec.json.Encoder().encode


class BatchJobs:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        generation: Generation,
        embeddings: Embeddings,
        errors: ErrorMapper,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.generation = generation
        self.embeddings = embeddings
        self.errors = errors
        self.store = BatchStore(Path(settings.batch_dir).expanduser())
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = asyncio.Semaphore(settings.batch_max_running)
        self._gates: dict[str, asyncio.Semaphore] = {}  # per tier: batch lines in flight
        self._locks: dict[str, asyncio.Lock] = {}  # per batch: one writer of its results at a time
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Read the store and resume the batches a stop interrupted."""
        await asyncio.to_thread(self.store.open)
        for batch in sorted(self.store.batches.values(), key=lambda b: b.created_at):
            if batch.status not in FINISHED:
                await asyncio.to_thread(self._recount, batch)
                log.info("Batch %s: resuming (%s, %d of %d done)", batch.id, batch.status, *_done_total(batch))
                self._launch(batch)

    async def close(self) -> None:
        """Stop running lines; their batches stay as they are on disk and resume at the next start."""
        self._closing = True
        for task in self._tasks.values():
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def _launch(self, batch: Batch) -> None:
        task = asyncio.create_task(self._run(batch), name=f"batch-{batch.id}")
        self._tasks[batch.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch.id, None))

    # -- files -----------------------------------------------------------------------------------
    async def upload(self, data: bytes, filename: str, purpose: str) -> FileObject:
        if purpose != "batch":
            raise InvalidRequestError(
                f"purpose {purpose[:40]!r} is not supported: this server keeps files for batches (purpose 'batch')",
                param="purpose",
            )
        settings = self.settings
        if len(data) > settings.batch_max_file_bytes:  # the route's body limit stops most before here
            raise InvalidRequestError(
                f"File is {len(data)} bytes, over {settings.batch_max_file_bytes} (BATCH_MAX_FILE_BYTES)", param="file"
            )
        uploads = sum(1 for f in self.store.files.values() if f.purpose == "batch")
        if uploads >= settings.batch_max_files:
            raise InvalidRequestError(
                f"{uploads} files are stored (BATCH_MAX_FILES); delete some with DELETE /v1/files/{{file_id}}",
                param="file",
                code="too_many_files",
            )
        _, problems = await asyncio.to_thread(
            parse_input, data, max_lines=settings.batch_max_lines, max_line_bytes=settings.batch_max_line_bytes
        )
        check_problems(problems)
        return await asyncio.to_thread(self.store.add_file, data, filename[:255] or "upload.jsonl")

    def file(self, file_id: str) -> FileObject:
        meta = self.store.files.get(file_id) if FILE_ID.fullmatch(file_id) else None
        if meta is None:
            raise NotFoundError(f"No such file: {file_id[:100]!r}", param="file_id", code="file_not_found")
        return meta

    def content(self, file_id: str) -> Path:
        return self.store.content(self.file(file_id).id)

    async def delete_file(self, file_id: str) -> FileDeleted:
        meta = self.file(file_id)
        for batch in self.store.batches.values():
            if batch.input_file_id == meta.id and batch.status not in FINISHED:
                raise InvalidRequestError(
                    f"File {meta.id} is the input of batch {batch.id}, which is {batch.status}; cancel it first",
                    param="file_id",
                    code="file_in_use",
                )
        await asyncio.to_thread(self.store.delete_file, meta.id)
        return FileDeleted(id=meta.id, deleted=True)

    def list_files(self, purpose: str | None, limit: int, order: str, after: str | None) -> FileList:
        files = sorted(self.store.files.values(), key=lambda f: (f.created_at, f.id), reverse=order == "desc")
        if purpose is not None:
            files = [f for f in files if f.purpose == purpose]
        page, more = _page(files, after, limit, lambda f: f.id)
        return FileList(data=page, has_more=more, first_id=_first(page), last_id=_last(page))

    # -- batches ---------------------------------------------------------------------------------
    async def create(self, data: BatchCreate) -> Batch:
        if data.output_expires_after is not None:
            raise InvalidRequestError(
                "output_expires_after is not supported: files are kept until deleted", param="output_expires_after"
            )
        try:
            source = self.file(data.input_file_id)
        except NotFoundError as exc:
            exc.param = "input_file_id"
            raise
        if source.purpose != "batch":
            raise InvalidRequestError(
                f"File {source.id} has purpose {source.purpose!r}; a batch's input needs purpose 'batch'",
                param="input_file_id",
            )
        await self._make_room()
        now = int(time.time())
        batch = Batch(
            id=new_id("batch_"),
            endpoint=data.endpoint,
            input_file_id=source.id,
            completion_window=data.completion_window,
            status="validating",
            created_at=now,
            expires_at=now + _WINDOW_SECONDS,
            metadata=data.metadata,
        )
        await asyncio.to_thread(self.store.save_batch, batch)
        self._launch(batch)
        return batch

    async def _make_room(self) -> None:
        """Past BATCH_MAX_BATCHES, forget the oldest finished batch; with none finished, 429."""
        stored = self.store.batches
        if len(stored) < self.settings.batch_max_batches:
            return
        finished = sorted((b for b in stored.values() if b.status in FINISHED), key=lambda b: b.created_at)
        if not finished:
            raise RateLimitError(
                f"{len(stored)} batches are unfinished (BATCH_MAX_BATCHES); retry when one ends",
                retry_after=60,
                code="too_many_batches",
            )
        await asyncio.to_thread(self.store.forget_batch, finished[0].id)

    def get(self, batch_id: str) -> Batch:
        batch = self.store.batches.get(batch_id) if BATCH_ID.fullmatch(batch_id) else None
        if batch is None:
            raise NotFoundError(f"No such batch: {batch_id[:100]!r}", param="batch_id", code="batch_not_found")
        return batch

    async def cancel(self, batch_id: str) -> Batch:
        batch = self.get(batch_id)
        if batch.status in FINISHED or batch.status in ("cancelling", "finalizing"):
            if batch.status in ("cancelled", "cancelling"):
                return batch
            raise InvalidRequestError(
                f"Batch {batch.id} is {batch.status} and cannot be cancelled", param="batch_id", code="batch_finished"
            )
        batch.cancelling_at = int(time.time())
        await self._move(batch, "cancelling")
        task = self._tasks.get(batch.id)
        if task is not None:
            task.cancel()  # the task finishes it as cancelled
        return batch

    def list_batches(self, after: str | None, limit: int) -> BatchList:
        batches = sorted(self.store.batches.values(), key=lambda b: (b.created_at, b.id), reverse=True)
        page, more = _page(batches, after, limit, lambda b: b.id)
        return BatchList(data=page, has_more=more, first_id=_first(page), last_id=_last(page))

    # -- running a batch ---------------------------------------------------------------------------
    async def _run(self, batch: Batch) -> None:
        try:
            if batch.status == "cancelling":  # cancelled before a stop: finish it so
                raise asyncio.CancelledError
            async with self._running:
                lines = await self._validate(batch) if batch.status == "validating" else await self._lines(batch)
                if lines is None:
                    return
                if batch.status == "in_progress":
                    await self._process(batch, lines)
            await self._finish(batch, "expired" if batch.status == "expired" else "completed")
        except asyncio.CancelledError:
            if self._closing or batch.status != "cancelling":
                raise  # the server is stopping: the batch resumes at the next start
            await self._finish(batch, "cancelled")
        except Exception as exc:  # a bug or a disk error: report it on the batch, never lose it
            log.exception("Batch %s failed", batch.id)
            await self._fail(
                batch, [BatchError(code="server_error", message=f"The batch failed: {type(exc).__name__}")]
            )

    async def _lines(self, batch: Batch) -> list[InputLine] | None:
        """The input of a batch that had passed validation (resumed after a restart)."""
        if batch.input_file_id not in self.store.files:
            await self._fail(batch, [BatchError(code="file_not_found", message="The input file is gone")])
            return None
        content = await asyncio.to_thread(self.store.read_file, batch.input_file_id)
        lines, _ = await asyncio.to_thread(parse_input, content, max_lines=2**31, max_line_bytes=2**31)
        return [line for _, line in lines]

    async def _validate(self, batch: Batch) -> list[InputLine] | None:
        settings = self.settings
        if batch.input_file_id not in self.store.files:
            await self._fail(batch, [BatchError(code="file_not_found", message="The input file was deleted")])
            return None
        content = await asyncio.to_thread(self.store.read_file, batch.input_file_id)
        lines, problems = await asyncio.to_thread(
            parse_input, content, max_lines=settings.batch_max_lines, max_line_bytes=settings.batch_max_line_bytes
        )
        problems += [
            LineProblem(number, f"url {line.url[:100]!r} does not match the batch's endpoint {batch.endpoint}", "url")
            for number, line in lines
            if line.url != batch.endpoint
        ]
        if problems:
            errors = [
                BatchError(code="invalid_request", message=p.message, param=p.param, line=p.line) for p in problems
            ]
            await self._fail(batch, sorted(errors[:100], key=lambda e: e.line or 0))
            return None
        batch.request_counts = RequestCounts(total=len(lines))
        batch.in_progress_at = int(time.time())
        await self._move(batch, "in_progress")
        return [line for _, line in lines]

    async def _process(self, batch: Batch, lines: list[InputLine]) -> None:
        done = await asyncio.to_thread(self._recount, batch)
        pending = deque(line for line in lines if line.custom_id not in done)

        async def work() -> None:
            while pending and time.time() < batch.expires_at:
                line = pending.popleft()
                await self._record(batch, *await self._line(batch, line))

        await asyncio.gather(*(work() for _ in range(self.settings.batch_concurrency)))
        if pending:  # past the completion window: what is left will not run
            for line in pending:
                error = LineError(code="batch_expired", message="The batch expired before this request ran")
                result = OutputLine(id=new_id("batch_req_"), custom_id=line.custom_id, response=None, error=error)
                await self._record(batch, result, (0, 0, 0))
            batch.status = "expired"

    def _recount(self, batch: Batch) -> set[str]:
        """request_counts and usage from the results on disk; the custom_ids that are done."""
        done: set[str] = set()
        batch.usage = BatchUsage()
        counts = RequestCounts(total=batch.request_counts.total)
        for line in self.store.done(batch.id, "output"):
            done.add(line.custom_id)
            counts.completed += 1
            batch.usage.add(*line.usage())
        for line in self.store.done(batch.id, "errors"):
            done.add(line.custom_id)
            counts.failed += 1
        batch.request_counts = counts
        return done

    async def _line(self, batch: Batch, line: InputLine) -> tuple[OutputLine, tuple[int, int, int]]:
        """The line's result, and the tokens it used (prompt, completion, cached)."""
        record = RequestRecord(batch.endpoint, "POST", observed=False)
        usage = (0, 0, 0)
        try:
            answer = await self._serve(batch.endpoint, bytes(line.body), record)
            status, body, usage = 200, _encode(answer), _usage(answer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = self.errors(exc)
            status, body = error.status, _encode(error.envelope())
        response = LineResponse(status_code=status, request_id=new_id("req_"), body=msgspec.Raw(body))
        return OutputLine(id=new_id("batch_req_"), custom_id=line.custom_id, response=response, error=None), usage

    async def _serve(
        self, endpoint: str, body: bytes, record: RequestRecord
    ) -> ChatCompletion | Completion | EmbeddingList:
        if endpoint == "/v1/embeddings":
            embed: EmbeddingCreate = decode_strict(body, EmbeddingCreate)
            async with self._gate(self.registry.resolve(embed.model)):
                return await self.embeddings.create(embed, record, background=True)
        data: ChatCompletionRequest | CompletionRequest = decode_strict(
            body, ChatCompletionRequest if endpoint == "/v1/chat/completions" else CompletionRequest
        )
        if data.stream:
            raise InvalidRequestError(
                "stream is not supported in a batch: each answer is written whole to the output file", param="stream"
            )
        generation = self.generation
        async with self._gate(generation.target(data.model, data.adapter).slot):
            answer = (
                await serve_chat(data, generation, record, background=True)
                if isinstance(data, ChatCompletionRequest)
                else await serve_completion(data, generation, record, background=True)
            )
        assert not isinstance(answer, Streamed)  # stream is refused above
        return answer

    @contextlib.asynccontextmanager
    async def _gate(self, slot: TierSlot) -> AsyncIterator[None]:
        """Hold one of the tier's BATCH_CONCURRENCY places, and go only when no interactive
        request waits for the tier (checked again after each short wait)."""
        # A tier still loading (at start-up, or a lazy one) is waited for: a 503 is for clients
        # that can retry, a background line has time.
        while slot.state is TierState.LOADING and slot.load_task is not None:
            await asyncio.shield(slot.load_task)
        gate = self._gates.setdefault(slot.name, asyncio.Semaphore(self.settings.batch_concurrency))
        async with gate:
            # Polled: the queue is counted by the model's worker thread, which has no event to await.
            while slot.interactive_waiting:  # noqa: ASYNC110
                await asyncio.sleep(_POLL_SECONDS)
            yield

    async def _record(self, batch: Batch, result: OutputLine, usage: tuple[int, int, int]) -> None:
        failed = result.response is None or result.response.status_code >= 400
        data = _encode(result)
        lock = self._locks.setdefault(batch.id, asyncio.Lock())
        async with lock:
            await asyncio.to_thread(self.store.append, batch.id, "errors" if failed else "output", data)
        if failed:
            batch.request_counts.failed += 1
        else:
            batch.request_counts.completed += 1
            batch.usage.add(*usage)

    async def _move(self, batch: Batch, status: BatchStatus) -> None:
        batch.status = status
        await asyncio.to_thread(self.store.save_batch, batch)

    async def _fail(self, batch: Batch, errors: list[BatchError]) -> None:
        batch.errors = BatchErrors(data=errors)
        batch.failed_at = int(time.time())
        await self._move(batch, "failed")

    async def _finish(self, batch: Batch, status: BatchStatus) -> None:
        """Results to their files, then the final status (finalizing in between, unless cancelled)."""
        if status != "cancelled":
            batch.finalizing_at = batch.finalizing_at or int(time.time())
            await self._move(batch, "finalizing")
        lock = self._locks.setdefault(batch.id, asyncio.Lock())
        async with lock:
            batch.output_file_id = await asyncio.to_thread(self.store.finish_results, batch.id, "output")
            batch.error_file_id = await asyncio.to_thread(self.store.finish_results, batch.id, "errors")
        now = int(time.time())
        if status == "completed":
            batch.completed_at = now
        elif status == "expired":
            batch.expired_at = now
        else:
            batch.cancelled_at = now
        self._locks.pop(batch.id, None)
        await self._move(batch, status)
        log.info("Batch %s %s: %d done, %d failed", batch.id, status, *_counts(batch))


def _done_total(batch: Batch) -> tuple[int, int]:
    counts = batch.request_counts
    return counts.completed + counts.failed, counts.total


def _counts(batch: Batch) -> tuple[int, int]:
    return batch.request_counts.completed, batch.request_counts.failed


def _usage(answer: ChatCompletion | Completion | EmbeddingList) -> tuple[int, int, int]:
    if isinstance(answer, EmbeddingList):
        return answer.usage.prompt_tokens, 0, 0
    usage = answer.usage
    if usage is None:
        return 0, 0, 0
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return usage.prompt_tokens, usage.completion_tokens, cached


def _page(items: list[Any], after: str | None, limit: int, key: Callable[[Any], str]) -> tuple[list[Any], bool]:
    start = 0
    if after is not None:
        ids = [key(item) for item in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    page = items[start : start + limit]
    return page, start + limit < len(items)


def _first(page: list[Any]) -> str | None:
    return page[0].id if page else None


def _last(page: list[Any]) -> str | None:
    return page[-1].id if page else None
