"""`/v1/files`: OpenAI's Files API, the input and result files of batches (see service/jobs/batches.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Controller, Request, delete, get, post
from litestar.datastructures import FormMultiDict, UploadFile
from litestar.params import Parameter
from litestar.response import File

from kernel.errors import InvalidRequestError
from service.jobs.batches import BatchJobs
from service.schemas.batches import FileDeleted, FileList, FileObject

_FORM_FIELDS = ("file", "purpose")


class FilesController(Controller):
    """Mounted on a router whose body limit is BATCH_MAX_FILE_BYTES (uploads are multipart)."""

    path = "/v1/files"

    @post(status_code=200, summary="Upload a batch input file (JSONL, purpose batch)", opt={"multipart": True})
    async def create(self, request: Request[Any, Any, Any], batches: BatchJobs) -> FileObject:
        form = await request.form()
        try:
            upload, purpose = _upload(form)
            return await batches.upload(await upload.read(), upload.filename or "", purpose)
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


def _upload(form: FormMultiDict) -> tuple[UploadFile, str]:
    """The one file and its purpose: any other field, or either one missing or repeated, is a 400."""
    for key in form:
        if key not in _FORM_FIELDS:
            raise InvalidRequestError(f"Unsupported form field {key[:40]!r}", param=key[:40])
    files = form.getall("file") if "file" in form else []
    purposes = form.getall("purpose") if "purpose" in form else []
    if len(files) != 1 or not isinstance(files[0], UploadFile):
        raise InvalidRequestError("Send exactly one file, as the multipart field 'file'", param="file")
    if len(purposes) != 1 or not isinstance(purposes[0], str):
        raise InvalidRequestError("Send the purpose ('batch') as the form field 'purpose'", param="purpose")
    return files[0], purposes[0]
