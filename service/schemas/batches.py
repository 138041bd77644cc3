"""OpenAI's Files and Batch API wire types, and the lines of batch input and output files."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
FINISHED: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})

CustomId = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
MetadataKey = Annotated[str, msgspec.Meta(max_length=64)]
MetadataValue = Annotated[str, msgspec.Meta(max_length=512)]


class FileObject(msgspec.Struct, kw_only=True):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    object: Literal["file"] = "file"
    status: Literal["processed"] = "processed"  # deprecated by OpenAI; always answered
    expires_at: int | None = None
    status_details: str | None = None


class FileList(msgspec.Struct, kw_only=True):
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: Literal["list"] = "list"


class FileDeleted(msgspec.Struct, kw_only=True):
    id: str
    deleted: bool
    object: Literal["file"] = "file"


class BatchCreate(msgspec.Struct, kw_only=True):
    input_file_id: Annotated[str, msgspec.Meta(max_length=100)]
    endpoint: BatchEndpoint
    completion_window: Literal["24h"]
    metadata: Annotated[dict[MetadataKey, MetadataValue], msgspec.Meta(max_length=16)] | None = None
    output_expires_after: Any = None  # known but not honoured: refused when given


class RequestCounts(msgspec.Struct):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(msgspec.Struct, kw_only=True):
    code: str
    message: str
    param: str | None = None
    line: int | None = None  # 1-based line of the input file


class BatchErrors(msgspec.Struct, kw_only=True):
    data: list[BatchError]
    object: Literal["list"] = "list"


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class BatchUsage(msgspec.Struct, kw_only=True):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)
    total_tokens: int = 0

    def add(self, prompt: int, completion: int, cached: int) -> None:
        self.input_tokens += prompt
        self.output_tokens += completion
        self.total_tokens += prompt + completion
        self.input_tokens_details.cached_tokens += cached


class Batch(msgspec.Struct, kw_only=True):
    """The wire object, and also what is stored on disk: everything a restart needs is here."""

    id: str
    endpoint: BatchEndpoint
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    expires_at: int
    request_counts: RequestCounts = msgspec.field(default_factory=RequestCounts)
    usage: BatchUsage = msgspec.field(default_factory=BatchUsage)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: BatchErrors | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    metadata: dict[str, str] | None = None
    model: str | None = None
    object: Literal["batch"] = "batch"


class BatchList(msgspec.Struct, kw_only=True):
    data: list[Batch]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: Literal["list"] = "list"


# -- the lines of input and output files ----------------------------------------------------------


class InputLine(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    custom_id: CustomId
    method: Literal["POST"]
    url: str
    body: msgspec.Raw  # decoded later, strictly, against the endpoint's request type


class LineResponse(msgspec.Struct, kw_only=True):
    status_code: int
    request_id: str
    body: msgspec.Raw


class LineError(msgspec.Struct, kw_only=True):
    code: str
    message: str


class OutputLine(msgspec.Struct, kw_only=True):
    id: str
    custom_id: str
    response: LineResponse | None
    error: LineError | None


# What a restart reads back from the results written so far: which lines are done, and their usage.
class _DoneTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class _DoneUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _DoneTokensDetails | None = None


class _DoneBody(msgspec.Struct):
    usage: _DoneUsage | None = None


class _DoneResponse(msgspec.Struct):
    body: _DoneBody | None = None


class DoneLine(msgspec.Struct):
    custom_id: str
    response: _DoneResponse | None = None

    def usage(self) -> tuple[int, int, int]:
        usage = self.response.body.usage if self.response and self.response.body else None
        if usage is None:
            return 0, 0, 0
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        return usage.prompt_tokens, usage.completion_tokens, cached
