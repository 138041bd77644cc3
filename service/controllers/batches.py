"""`/v1/batches`: OpenAI's Batch API (see service/jobs/batches.py)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.params import Parameter

from service.jobs.batches import BatchJobs
from service.schemas.batches import Batch, BatchCreate, BatchList


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
