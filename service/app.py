"""The Litestar application: `create_app(settings=None)`."""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.middleware import DefineMiddleware
from litestar.routes import HTTPRoute
from litestar.types import Empty

from kernel.errors import InvalidRequestError, LLMServiceError
from service.cache import ResponseCache
from service.controllers.adapters import AdaptersController
from service.controllers.admin import AdminController
from service.controllers.batches import BatchesController
from service.controllers.chat import ChatController
from service.controllers.collections import CollectionsController, DocumentsController
from service.controllers.completions import CompletionsController
from service.controllers.config import ConfigController
from service.controllers.console import console_routes
from service.controllers.embeddings import EmbeddingsController
from service.controllers.files import FilesController
from service.controllers.messages import MessagesController
from service.controllers.models import ModelsController, health
from service.controllers.pull import PullController
from service.controllers.rerank import rerank
from service.controllers.responses import ResponsesController
from service.controllers.tokenize import TokenizeController
from service.controllers.ws import ws
from service.disconnect import DisconnectMiddleware
from service.jobs.batches import BatchJobs
from service.jobs.collections import Collections
from service.jobs.rag import RagChat
from service.lifecycle import Lifecycle
from service.metrics import RequestRecord, Telemetry, TelemetryMiddleware, request_record
from service.openapi import openapi_config
from service.runtime_config import RuntimeConfig
from service.schemas.common import UNKNOWN_FIELD, decode_strict, unknown_field_error
from service.security import Security, cors_config
from service.serving.caches import Caches
from service.serving.embeddings import Embeddings
from service.serving.generation import Generation
from service.serving.models import Models
from service.serving.rerank import Rerank
from service.serving.response_store import ResponseStore
from service.serving.websocket import WebSocketSessions
from service.settings import Settings, load_settings
from service.tiers.families import EngineFactories
from service.tiers.registry import Registry
from service.tiers.slots import TierState

log = logging.getLogger("service")

_HTTP_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


class JsonRequest(Request[Any, Any, Any]):
    """Request bodies decoded where they enter: strictly against the handler's type (Litestar
    converts leniently: `"stream": 1` would pass as a boolean, `"max_tokens": "5"` as a number),
    and bytes msgspec cannot read (invalid UTF-8, nesting past the recursion limit) become 400s.
    Decoded once: the typed value is what the handler gets (Litestar's signature model passes a
    Struct of its own type through), not decoded again to dicts and converted (~0.4 ms of an
    agent's 130 KB chat request)."""

    async def json(self) -> Any:
        if self._json is Empty and self._connection_state.json is Empty:
            body = await self.body()
            field = self.route_handler.parsed_data_field
            self._json = self._connection_state.json = decode_strict(body, field.annotation if field else Any)
        return await super().json()


def create_app(
    settings: Settings | None = None, *, env_file: str | Path | None = None, engines: EngineFactories | None = None
) -> Litestar:
    """`env_file`: the `.env` the settings came from, which `PATCH /v1/config` may write back to
    (without settings, they are read from `.env`, which is then that file). `engines`: how each
    model family builds its engine; the real engines by default (tests of the app pass fakes)."""
    if settings is None:
        settings, env_file = load_settings(), env_file or ".env"
    registry = Registry(settings, engines)
    cache = ResponseCache.from_settings(settings)
    telemetry = Telemetry(settings, registry, cache)
    lifecycle = Lifecycle(registry, settings)
    security = Security.from_settings(settings)
    generation = Generation(registry, cache, settings)
    config = RuntimeConfig(settings, registry, lifecycle, security, env_file)
    embeddings = Embeddings(registry, cache)
    reranker = Rerank(registry, cache)
    models = Models(registry, lifecycle)
    caches = Caches(cache, registry, telemetry)
    collections = Collections(settings, registry, embeddings, reranker)
    rag = RagChat(collections, generation)
    batches = BatchJobs(settings, registry, generation, embeddings, to_service_error)
    sessions = WebSocketSessions(settings, generation, telemetry, security, to_service_error)
    responses = ResponseStore(
        Path(settings.batch_dir).expanduser() / "responses",
        max_stored=settings.responses_max_stored,
        max_bytes=settings.responses_max_bytes,
    )
    # Uploads are multipart JSONL files, bounded by BATCH_MAX_FILE_BYTES rather than MAX_BODY_BYTES.
    files = Router("/", route_handlers=[FilesController], request_max_body_size=settings.batch_max_file_bytes + 65536)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await cache.open()
        await registry.start()
        await lifecycle.start()
        await batches.start()
        await asyncio.to_thread(responses.open)
        announce = asyncio.create_task(_announce(app, registry), name="announce")
        try:
            yield
        finally:
            announce.cancel()
            await batches.close()  # before the models go: running lines stop, and resume at the next start
            await asyncio.to_thread(responses.close)
            await lifecycle.close()
            try:
                await collections.close()
                await registry.close()
            finally:
                await cache.close()

    app = Litestar(
        route_handlers=[
            ChatController,
            CompletionsController,
            EmbeddingsController,
            rerank,
            PullController,
            ModelsController,
            TokenizeController,
            MessagesController,
            ResponsesController,
            AdminController,
            AdaptersController,
            ConfigController,
            files,
            BatchesController,
            # The handshake's Host/Origin check: `before_request` (below) is for HTTP routes only.
            Router("/", route_handlers=[ws], guards=[security.guard]),
            CollectionsController,
            DocumentsController,
            health,
            *console_routes(keys_required=security.keys.required),
        ],
        dependencies={
            "registry": Provide(lambda: registry, use_cache=True, sync_to_thread=False),
            "cache": Provide(lambda: cache, use_cache=True, sync_to_thread=False),
            "telemetry": Provide(lambda: telemetry, use_cache=True, sync_to_thread=False),
            "lifecycle": Provide(lambda: lifecycle, use_cache=True, sync_to_thread=False),
            "generation": Provide(lambda: generation, use_cache=True, sync_to_thread=False),
            "embeddings": Provide(lambda: embeddings, use_cache=True, sync_to_thread=False),
            "reranker": Provide(lambda: reranker, use_cache=True, sync_to_thread=False),
            "models": Provide(lambda: models, use_cache=True, sync_to_thread=False),
            "caches": Provide(lambda: caches, use_cache=True, sync_to_thread=False),
            "config": Provide(lambda: config, use_cache=True, sync_to_thread=False),
            "security": Provide(lambda: security, use_cache=True, sync_to_thread=False),
            "batches": Provide(lambda: batches, use_cache=True, sync_to_thread=False),
            "responses": Provide(lambda: responses, use_cache=True, sync_to_thread=False),
            "errors": Provide(lambda: to_service_error, use_cache=True, sync_to_thread=False),
            "collections": Provide(lambda: collections, use_cache=True, sync_to_thread=False),
            "rag": Provide(lambda: rag, use_cache=True, sync_to_thread=False),
            "sessions": Provide(lambda: sessions, use_cache=True, sync_to_thread=False),
            "record": Provide(_record, sync_to_thread=False),
        },
        # Outermost first: telemetry sees the 499 of a request whose client went away.
        middleware=[DefineMiddleware(TelemetryMiddleware, telemetry=telemetry), DisconnectMiddleware],
        exception_handlers={Exception: _error_response},
        lifespan=[lifespan],
        cors_config=cors_config(settings),
        request_max_body_size=settings.max_body_bytes,
        request_class=JsonRequest,
        state=State(
            {"registry": registry, "settings": settings, "drain": generation.drain, "last_activity": time.monotonic()}
        ),
        before_request=functools.partial(_before_request, security),
        openapi_config=openapi_config(_version()),
        logging_config=None,
    )
    _dependencies_in_turn(app)
    return app


def _dependencies_in_turn(app: Litestar) -> None:
    """Litestar resolves a handler's independent dependencies side by side, in an anyio task group
    with a task each (~0.2 ms before every handler that takes two); ours hand over objects made
    once, so they are resolved one after another in the request's own task."""
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            for _, kwargs in route.route_handler_map.values():
                kwargs.dependency_batches = [{each} for batch in kwargs.dependency_batches for each in batch]


def _version() -> str:
    try:
        return importlib.metadata.version("llmservice")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing it
        return "0.0.0"


async def _announce(app: Litestar, registry: Registry) -> None:
    """Once the preloading tiers have settled, say in one line where the server is and what it serves."""
    await registry.preloaded()
    tiers = [
        f"{s.id} ({s.engine_name} on {s.device})" if s.state is TierState.LOADED else f"{s.name}: {s.state.value}"
        for s in registry.configured()
    ]
    url = app.state.get("url") or "this app"
    log.info("Ready on %s/v1: %s", url, "; ".join(tiers) or "no model tiers configured")


def _record(request: Request[Any, Any, Any]) -> RequestRecord:
    return request_record(request.scope)


async def _before_request(security: Security, request: Request[Any, Any, Any]) -> None:
    """Every HTTP request, before its body is read: note the activity (idle shutdown), then the
    security checks. Not an app-wide Litestar guard: Litestar copies the route handler for every
    guard call, ~0.1-0.2 ms a request."""
    request.app.state.last_activity = time.monotonic()
    await security.guard(request, request.route_handler)


def to_service_error(exc: Exception, body_type: Any = None) -> LLMServiceError:
    """The one place where every exception becomes our error tree (`body_type`: the route's
    request body type, which knows the fields an unknown one was meant to be)."""
    if isinstance(exc, LLMServiceError):
        return exc
    if isinstance(exc, ValidationException):
        return _validation_error(exc, body_type)
    if isinstance(exc, HTTPException):
        status = exc.status_code
        if status == 404:
            return _http(
                404, f"Not found: no route {exc.detail!r}" if exc.detail != "Not Found" else "Not found: no such route"
            )
        if status == 405:
            return _http(405, "Method not allowed for this route")
        if status == 413:
            return _http(413, "Request body too large")
        if status == 400:  # Litestar raises a bare ClientException when msgspec cannot decode the body
            return InvalidRequestError(f"Malformed JSON body: {exc.detail}")
        return _http(status, exc.detail or "Request failed")
    log.exception("Unhandled error", exc_info=exc)
    return LLMServiceError("Internal server error")


def _http(status: int, message: str) -> LLMServiceError:
    err = InvalidRequestError(message)
    err.status = status  # type: ignore[misc]
    err.type = _HTTP_TYPES.get(status, "invalid_request_error")  # type: ignore[misc]
    return err


def _validation_error(exc: ValidationException, body_type: Any) -> InvalidRequestError:
    extra = exc.extra if isinstance(exc.extra, list) else []
    if extra and isinstance(extra[0], dict):
        key = str(extra[0].get("key") or "")
        if key == "data":  # the handler's body parameter: the request came without one
            return InvalidRequestError("Invalid request: this endpoint needs a JSON request body")
        message = str(extra[0].get("message") or exc.detail)
        if message.startswith(UNKNOWN_FIELD) and body_type is not None:
            return unknown_field_error(body_type, key or None, message)
        text = f"{message} at `{key}`" if key else message
        return InvalidRequestError(f"Invalid request: {text}", param=key or None)
    return InvalidRequestError(f"Invalid request: {exc.detail}")


def _error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, object]]:
    body = getattr(request.scope.get("route_handler"), "parsed_data_field", None)
    error = to_service_error(exc, getattr(body, "annotation", None))
    retry_after = getattr(error, "retry_after", None)
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else {}
    if isinstance(exc, HTTPException) and exc.headers:
        headers.update(exc.headers)  # Litestar's own, e.g. `Allow` on a 405
    return Response(error.envelope(), status_code=error.status, headers=headers or None)
