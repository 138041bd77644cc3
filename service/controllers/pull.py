"""`POST /v1/models/pull` (admin): from the hub into MODELS_DIR. `DELETE /v1/models/{id}` is in
ModelsController, which owns that path."""

from __future__ import annotations

from litestar import Controller, post

from service.lifecycle import Lifecycle
from service.schemas.pull import PullRequest, PullResult
from service.serving.pulls import Pulls
from service.serving.streaming import EventStream

_EVENTS = (
    'With `stream: true` (the default): `data: {"status": "downloading", "file", "completed", "total", "rate"}`'
    ' events, then `data: {"status": "success", "id"}` or one `data: {"status": "error", "error": {...}}`'
)


class PullController(Controller):
    path = "/v1/models"

    @post(
        "/pull",
        status_code=200,
        summary="Pull a model from the hub into MODELS_DIR",
        opt={"admin": True, "stream_events": _EVENTS},
    )
    async def pull(self, data: PullRequest, lifecycle: Lifecycle) -> PullResult | EventStream:
        pulls = Pulls(lifecycle)
        if data.stream:
            return EventStream(pulls.events(data.model, data.revision), first_ready=False)
        return PullResult("success", await pulls.pull(data.model, data.revision))
