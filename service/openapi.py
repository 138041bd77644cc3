"""The OpenAPI document: `/schema` (Scalar), `/schema/swagger`, `/schema/openapi.json`.

Both UIs load their scripts from this server (`service/static/openapi`, vendored with their
licences), not from a CDN: on an offline machine they would otherwise be blank pages.

Litestar generates the paths and operations; `describe` then amends that document in one place so
it says what the server really does:
- bodies and answers are the msgspec schemas of the handlers' own types (msgspec decodes them, so
  its schema is the truth; Litestar's generator drops zero bounds such as `temperature >= 0`);
- every error status a route can answer carries the OpenAI envelope, not Litestar's own body;
- streaming routes answer `text/event-stream` beside JSON, `/metrics` answers Prometheus text;
- when API keys are on, the routes that need one say so (bearer auth).
"""

from __future__ import annotations

import copy
import functools
import operator
import types
import typing
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, Router
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.routes import HTTPRoute

from service.schemas.common import ErrorResponse
from service.settings import Settings

_REF = "#/components/schemas/{name}"
_UI = "/static/openapi"
_SCALAR = f"{_UI}/scalar-1.76.4"
_SWAGGER = f"{_UI}/swagger-ui-5.35.0"
_NO_FAVICON = "<link rel='icon' href='data:,'>"  # Litestar's default icon comes from a CDN
# Scalar fetches fonts and reports telemetry to its own servers unless told not to.
_SCALAR_OPTIONS = {"withDefaultFonts": False, "telemetry": False, "hideClientButton": True}
_ERRORS = {
    400: "Invalid request: a body that breaks this schema, a value the model cannot serve (`context_length_exceeded`),"
    " or a `Host` header that does not name this server (`host_not_allowed`)",
    401: "Missing or wrong API key (only when API_KEYS or ADMIN_API_KEYS are set)",
    403: "A web page's `Origin` outside CORS_ORIGINS, an admin route without an admin key, or a model path outside"
    " MODELS_DIR",
    404: "No such model (`model_not_found`, the message lists what is served), tier (`model_not_available`),"
    " file (`file_not_found`) or batch (`batch_not_found`); on /v1/collections also no such collection"
    " (`collection_not_found`) or document (`document_not_found`)",
    409: "The collection exists (`collection_exists`), or was embedded with a model the embedding tier no longer"
    " serves (`embedding_model_mismatch`)",
    413: "Request body larger than MAX_BODY_BYTES (BATCH_MAX_FILE_BYTES for a file upload)",
    415: "A body that is not `Content-Type: application/json` (`unsupported_media_type`); a file upload is"
    " `multipart/form-data`",
    429: "Rate limit (`rate_limit_exceeded`) or the tier's queue is full (`queue_full`); see `Retry-After`",
    503: "The tier is loading (`model_loading`, with `Retry-After`) or failed to load; on /v1/collections also"
    " the vector store cannot be opened or reached (`store_unavailable`)",
}
_RETRY_AFTER = {"description": "Seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}
_DESCRIPTION = """A local, OpenAI-compatible server for chat, completions, embeddings and reranking.

Every request must name this server in its `Host` header (a localhost name, the bound address, an IP
address or ALLOWED_HOSTS), else 400 `host_not_allowed`. Request bodies must be sent as
`Content-Type: application/json` (else 415). Requests from web pages (`Origin`) are refused unless
CORS_ORIGINS allows them; admin routes refuse every page. When API_KEYS are set every route but
`/health` and this document needs `Authorization: Bearer <key>`; routes marked admin need an
ADMIN_API_KEYS key whenever any key is set. Every error is `{"error": {"message", "type", "param",
"code"}}`.

`/v1/ws` (WebSocket, not listed below) carries the chat and completions request bodies, several at
once by id: send `{"type": "chat.completions" | "completions", "id", "body"}`, `{"type": "cancel",
"id"}`, `{"type": "ping"}` or first `{"type": "auth", "api_key"}`; receive `chunk`, `response`,
`error` (`{"type", "id", "status", "error": {...}}`), `done`, `pong` and `authenticated` messages.
"""


class _Document(JsonRenderPlugin):
    """`/schema/openapi.json`: Litestar's document, amended once by `describe`."""

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        state = request.app.state
        if state.get("openapi_document") is None:
            state.openapi_document = describe(request.app, openapi_schema, state.settings)
        return self.render_json(request, state.openapi_document)


def openapi_config(version: str) -> OpenAPIConfig:
    # The documents are public (a browser cannot send a bearer key to the UI) and not traffic.
    router = Router("/schema", route_handlers=[], include_in_schema=False, opt={"public": True, "observe": False})
    return OpenAPIConfig(
        title="llmservice",
        version=version,
        description=_DESCRIPTION,
        render_plugins=[
            ScalarRenderPlugin(
                path="/",
                js_url=f"{_SCALAR}/standalone.js",
                css_url=f"{_UI}/scalar-page.css?v={version}",
                favicon=_NO_FAVICON,
                options=_SCALAR_OPTIONS,
            ),
            SwaggerRenderPlugin(
                path="/swagger",
                js_url=f"{_SWAGGER}/swagger-ui-bundle.js",
                css_url=f"{_SWAGGER}/swagger-ui.css",
                standalone_preset_js_url=f"{_SWAGGER}/swagger-ui-standalone-preset.js",
                favicon=_NO_FAVICON,
            ),
            _Document(),
        ],
        openapi_router=router,
    )


def describe(app: Litestar, generated: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Litestar's document with our bodies, error envelope, media types and key requirements."""
    doc = copy.deepcopy(generated)
    handlers = [
        (route.path_format, method.lower(), handler)
        for route in app.routes
        if isinstance(route, HTTPRoute)
        for handler in route.route_handlers
        for method in handler.http_methods
        if method.lower() in generated["paths"].get(route.path_format, {})
    ]
    structs = {s for _, _, h in handlers for s in _structs(_body_type(h))}
    structs |= {s for _, _, h in handlers for s in _structs(h.parsed_fn_signature.return_type.annotation)}
    structs |= {e for _, _, h in handlers if isinstance(e := h.opt.get("stream_events"), type)}
    _, components = msgspec.json.schema_components(
        sorted({*structs, ErrorResponse}, key=lambda t: t.__name__), ref_template=_REF
    )
    doc.setdefault("components", {})["schemas"] = {**doc["components"].get("schemas", {}), **components}
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, method, handler in handlers:
        _amend(doc["paths"][path][method], handler, settings)
        if actions := handler.opt.get("actions"):
            _split_actions(doc["paths"], path, method, actions)
    return doc


def _split_actions(paths: dict[str, Any], path: str, method: str, actions: dict[str, bool]) -> None:
    """`POST /v1/models/{model_id}` serves `{model_id}/load` and `{model_id}/unload` (ids contain
    slashes, so one `:path` parameter takes both): document the paths a client calls."""
    operation = paths[path].pop(method)
    if not paths[path]:
        del paths[path]
    for action, takes_body in actions.items():
        split = copy.deepcopy(operation)
        split["operationId"] = f"{operation.get('operationId', '')}{action.title()}"
        split["summary"] = f"{action.title()} a model (admin)"
        if not takes_body:
            split.pop("requestBody", None)
            for status in ("413", "415"):
                split["responses"].pop(status, None)
        paths.setdefault(f"{path}/{action}", {})[method] = split


def _amend(operation: dict[str, Any], handler: HTTPRouteHandler, settings: Settings) -> None:
    body = _body_type(handler)
    if handler.opt.get("multipart"):
        operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": _UPLOAD}}}
    elif body is not None:
        schema, optional = _schema(body)
        operation["requestBody"] = {"required": not optional, "content": {"application/json": {"schema": schema}}}
    responses = operation["responses"]
    success = responses[str(handler.status_code)]
    returned = handler.parsed_fn_signature.return_type.annotation
    if (events := handler.opt.get("stream_events")) is not None:
        returned = _without(returned, Response)  # the stream, and a remote tier's relayed answer (passthrough)
        described = (  # a route with other framing (Anthropic's named events) describes it itself
            events
            if isinstance(events, str)
            else f"With `stream: true`: `data: <{events.__name__}>` events (see that schema), an "
            'error after the start as one `data: {"error": {...}}` event, then `data: [DONE]`'
        )
        success["content"] = {
            "application/json": {"schema": _schema(returned)[0]},
            # Before OpenAPI 3.2 a sequential media type's schema describes one event.
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "description": described,
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                    "required": ["data"],
                }
            },
        }
    elif (media := handler.opt.get("media_type")) is not None:
        success["content"] = {media: {"schema": {"type": "string"}}}
    elif _structs(returned):
        success["content"] = {"application/json": {"schema": _schema(returned)[0]}}

    public = bool(handler.opt.get("public"))
    statuses = {400, 403}
    if not public:
        statuses |= {401, 429}
    if body is not None or handler.opt.get("multipart"):
        statuses |= {413, 415}
    if _names_model(handler, body):
        statuses |= {404, 503}
    statuses |= set(handler.opt.get("errors", ()))  # what a route answers besides the above
    if _names_stored(handler, body):
        statuses |= {404}
    for status in sorted(statuses):
        responses[str(status)] = _error(status)
    if not public and (
        settings.api_keys or settings.api_keys_file or (handler.opt.get("admin") and _any_keys(settings))
    ):
        operation["security"] = [{"bearer": []}]
    if handler.opt.get("admin"):
        operation["description"] = (
            operation.get("description", "") + "\n\nAdmin route: needs an ADMIN_API_KEYS key "
            "whenever any API key is set, and refuses requests from web pages."
        ).strip()


def _any_keys(settings: Settings) -> bool:
    return bool(settings.api_keys or settings.api_keys_file or settings.admin_api_keys)


def _error(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _ERRORS[status],
        "content": {"application/json": {"schema": {"$ref": _REF.format(name=ErrorResponse.__name__)}}},
    }
    if status in (429, 503):
        response["headers"] = {"Retry-After": _RETRY_AFTER}
    return response


def _body_type(handler: HTTPRouteHandler) -> Any:
    field = handler.parsed_data_field
    return field.annotation if field is not None else None


def _names_model(handler: HTTPRouteHandler, body: Any) -> bool:
    """Routes that pick a tier: a `model` in the body or a model id in the path."""
    if "model_id" in handler.parsed_fn_signature.parameters:
        return True
    return any("model" in getattr(s, "__struct_fields__", ()) for s in _structs(body))


def _names_stored(handler: HTTPRouteHandler, body: Any) -> bool:
    """Routes that name a stored file or batch, in the path or the body."""
    if {"file_id", "batch_id"} & set(handler.parsed_fn_signature.parameters):
        return True
    return any("input_file_id" in getattr(s, "__struct_fields__", ()) for s in _structs(body))


# `POST /v1/files`, as the openai SDK sends it.
_UPLOAD = {
    "type": "object",
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "JSONL: one batch request a line"},
        "purpose": {"type": "string", "enum": ["batch"]},
    },
    "required": ["file", "purpose"],
}


def _schema(annotation: Any) -> tuple[dict[str, Any], bool]:
    """The msgspec schema of `annotation` (None dropped), and whether None was in it."""
    args = typing.get_args(annotation) if _is_union(annotation) else ()
    optional = type(None) in args
    if optional:
        annotation = _without(annotation, type(None))
    schema, _ = msgspec.json.schema_components([annotation], ref_template=_REF)
    return schema[0], optional


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _without(annotation: Any, drop: type) -> Any:
    """`annotation` without `drop`, its subclasses and its parametrised forms (`Response[Any]`)."""
    if not _is_union(annotation):
        return annotation
    kept = [a for a in typing.get_args(annotation) if not _is_a(a, drop)]
    return functools.reduce(operator.or_, kept)


def _is_a(annotation: Any, cls: type) -> bool:
    origin = typing.get_origin(annotation) or annotation
    return isinstance(origin, type) and issubclass(origin, cls)


def _structs(annotation: Any) -> set[type[msgspec.Struct]]:
    """The msgspec Structs named in an annotation (through unions, lists and Annotated)."""
    if annotation is None:
        return set()
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return {annotation}
    found: set[type[msgspec.Struct]] = set()
    for arg in typing.get_args(annotation):
        found |= _structs(arg)
    return found
