from __future__ import annotations

from typing import Any

from litestar import Controller, Response, delete, get, post
from litestar.exceptions import NotFoundException
from litestar.openapi import ResponseSpec

from service.lifecycle import Lifecycle
from service.schemas.models import LoadRequest, ModelCard, ModelList
from service.schemas.pull import DeleteResult
from service.serving.models import Models
from service.serving.pulls import Pulls


class ModelsController(Controller):
    path = "/v1/models"

    @get(summary="List models")
    async def list_models(self, models: Models) -> ModelList:
        return models.all()

    @get("/{model_id:path}", summary="Retrieve a model")
    async def get_model(self, model_id: str, models: Models) -> ModelCard:
        return models.get(model_id.lstrip("/"))

    # `{id}/load` and `{id}/unload` share the path parameter: ids contain slashes (`light/gemma-3-270m`).
    @post("/{model_id:path}", status_code=200, opt={"admin": True, "actions": {"load": True, "unload": False}})
    async def model_action(self, model_id: str, models: Models, data: LoadRequest | None = None) -> ModelCard:
        target, _, action = model_id.strip("/").rpartition("/")
        if action == "load" and target:
            return await models.load(target, data.model_path if data else None)
        if action == "unload" and target:
            return await models.unload(target)
        raise NotFoundException()

    @delete("/{model_id:path}", status_code=200, summary="Delete a pulled model from MODELS_DIR", opt={"admin": True})
    async def delete_model(self, model_id: str, lifecycle: Lifecycle) -> DeleteResult:
        return DeleteResult(Pulls(lifecycle).delete(model_id.strip("/")))


@get(
    "/health",
    summary="Health of the server and each tier",
    sync_to_thread=False,
    opt={"public": True, "observe": False},
    responses={
        503: ResponseSpec(
            dict[str, Any], generate_examples=False, description="No tier can serve: the same body, `unhealthy`"
        )
    },
)
def health(models: Models) -> Response[dict[str, Any]]:
    body = models.health()
    return Response(body, status_code=200 if body["status"] == "healthy" else 503)
