"""`/v1/files` and `/v1/batches`: OpenAI's Files and Batch API (see service/jobs/batches.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Controller, Request, delete, get, post
from litestar.datastructures import UploadFile
from litestar.params import Parameter
from litestar.response import File

from kernel.errors import InvalidRequestError
from service.jobs.batches import BatchJobs
from service.schemas.batches import Batch, BatchCreate, BatchList, FileDeleted, FileList, FileObject

_FORM_FIELDS = ("file", "purpose")


class FilesController(Controller):
    """Mounted on a router whose body limit is BATCH_MAX_FILE_BYTES (uploads are multipart)."""

    path = "/v1/files"

    @post(status_code=200, summary="Upload a batch input file (JSONL, purpose batch)", opt={"multipart": True})
    async def create(self, request: Request[Any, Any, Any], batches: BatchJobs) -> FileObject:
        form = await request.form()
        try:
            for key in form:
                if key not in _FORM_FIELDS:
                    raise InvalidRequestError(f"Unsupported form field {key[:40]!r}", param=key[:40])
            files, purposes = (
                form.getall("file") if "file" in form else [],
                form.getall("purpose") if "purpose" in form else [],
            )
            if len(files) != 1 or not isinstance(files[0], UploadFile):
                raise InvalidRequestError("Send exactly one file, as the multipart field 'file'", param="file")
            if len(purposes) != 1 or not isinstance(purposes[0], str):
                raise InvalidRequestError("Send the purpose ('batch') as the form field 'purpose'", param="purpose")
            upload = files[0]
            data = await upload.read()
            return await batches.upload(data, upload.filename or "", purposes[0])
        finally:
            for value in form.values():
                if isinstance(value, UploadFile):
                    await value.close()

    @get(summary="List files")
    async def list_files(
        self,
        batches: BatchJobs,
        purpose: str | None = None,
        limit: Annotated[int, Parameter(ge=1, le=10_000)] = 10_000,
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
    ) -> FileList:
        return batches.list_files(purpose, limit, order, after)

    @get("/{file_id:str}", summary="Retrieve a file's metadata")
    async def retrieve(self, file_id: str, batches: BatchJobs) -> FileObject:
        return batches.file(file_id)

    @get(
        "/{file_id:str}/content",
        summary="Download a file's content",
        media_type="application/octet-stream",
        opt={"media_type": "application/octet-stream"},
    )
    async def content(self, file_id: str, batches: BatchJobs) -> File:
        # Served as an attachment named by its id: never rendered by a browser, never a client's name.
        return File(batches.content(file_id), filename=f"{file_id}.jsonl", media_type="application/octet-stream")

    @delete("/{file_id:str}", status_code=200, summary="Delete a file")
    async def remove(self, file_id: str, batches: BatchJobs) -> FileDeleted:
        return await batches.delete_file(file_id)


class BatchesController(Controller):
    path = "/v1/batches"

    @post(status_code=200, summary="Create a batch from an uploaded file")
    async def create(self, data: BatchCreate, batches: BatchJobs) -> Batch:
        return await batches.create(data)

    @get(summary="List batches, newest first")
    async def list_batches(
        self, batches: BatchJobs, after: str | None = None, limit: Annotated[int, Parameter(ge=1, le=100)] = 20
    ) -> BatchList:
        return batches.list_batches(after, limit)

    @get("/{batch_id:str}", summary="Retrieve a batch")
    async def retrieve(self, batch_id: str, batches: BatchJobs) -> Batch:
        return batches.get(batch_id)

    @post("/{batch_id:str}/cancel", status_code=200, summary="Cancel a batch")
    async def cancel(self, batch_id: str, batches: BatchJobs) -> Batch:
        return await batches.cancel(batch_id)
