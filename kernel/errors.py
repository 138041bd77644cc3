"""The one error tree of llmservice.

    LLMServiceError                 500 server_error (a bug if it ever reaches a client)
    ├── InvalidRequestError         400 invalid_request_error
    │   ├── ContextLengthExceeded   400 code=context_length_exceeded
    │   └── UnsupportedMediaType    415 (a body that is not `Content-Type: application/json`)
    ├── AuthenticationError         401 authentication_error
    ├── PermissionDeniedError       403 permission_error (admin key needed, path outside MODELS_DIR)
    ├── ModelNotFoundError          404 code=model_not_found
    ├── AdapterNotFoundError        404 code=adapter_not_found (a LoRA adapter the tier does not have)
    ├── TierNotConfiguredError      404 code=model_not_available (a tier without MODEL_PATH)
    ├── NotFoundError               404 code=collection_not_found, document_not_found, file_not_found, batch_not_found
    ├── ConflictError               409 code=collection_exists, embedding_model_mismatch
    ├── RateLimitError              429 (queue full or rate limit; carries retry_after)
    ├── ModelUnavailableError       503 (tier failed to load, engine missing)
    │   └── ModelLoadingError       503 code=model_loading, with Retry-After
    ├── StoreUnavailableError       503 code=store_unavailable (the vector store cannot be opened or reached)
    ├── UpstreamError               502 code=upstream_error (a remote tier's upstream failed or answered garbage)
    │   └── UpstreamUnavailableError 503 code=upstream_unavailable, with Retry-After (no upstream to try)
    └── EngineError                 500 an engine failed; the message is generic

Engines raise these too, so this module imports nothing from Litestar; `service.app` maps the
tree to the OpenAI envelope in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar


class LLMServiceError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def envelope(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(LLMServiceError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequestError):
    def __init__(self, prompt_tokens: int, context_length: int, *, param: str = "messages") -> None:
        super().__init__(
            f"This model's maximum context length is {context_length} tokens, but the prompt has "
            f"{prompt_tokens} tokens. Shorten the prompt or raise N_CTX.",
            param=param,
            code="context_length_exceeded",
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length

    @classmethod
    def of_characters(cls, characters: int, context_length: int, *, param: str) -> ContextLengthExceeded:
        """Refused before tokenising: the prompt has far more characters than the context has tokens."""
        error = cls(characters, context_length, param=param)
        error.message = (
            f"This model's maximum context length is {context_length} tokens, but the prompt has {characters} "
            f"characters, too many to fit. Shorten the prompt or raise N_CTX."
        )
        error.args = (error.message,)
        return error


class UnsupportedMediaType(InvalidRequestError):
    status = 415

    def __init__(self, content_type: str) -> None:
        shown = content_type[:100] or "none"
        super().__init__(
            f"Request bodies must be JSON sent as 'Content-Type: application/json' (got {shown!r})",
            code="unsupported_media_type",
        )


class AuthenticationError(LLMServiceError):
    status = 401
    type = "authentication_error"


class PermissionDeniedError(LLMServiceError):
    status = 403
    type = "permission_error"


class ModelNotFoundError(LLMServiceError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", code="model_not_found")


class AdapterNotFoundError(LLMServiceError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, adapter: str, where: str, available: list[str], *, param: str = "model") -> None:
        shown = adapter if len(adapter) <= 100 else adapter[:100] + "…"
        listed = ", ".join(available) or "none"
        super().__init__(
            f"Adapter not found: {shown} on {where}. Available adapters: {listed}",
            param=param,
            code="adapter_not_found",
        )


class TierNotConfiguredError(LLMServiceError):
    status = 404
    type = "model_error"

    def __init__(self, tier: str) -> None:
        super().__init__(f"No models available for tier: {tier}", param="model", code="model_not_available")


class NotFoundError(LLMServiceError):
    """A collection, document, file or batch that does not exist (`code` says which)."""

    status = 404
    type = "invalid_request_error"


class ConflictError(LLMServiceError):
    status = 409
    type = "invalid_request_error"


class RateLimitError(LLMServiceError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float, code: str = "rate_limit_exceeded") -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def envelope(self) -> dict[str, object]:
        body = super().envelope()
        error = body["error"]
        assert isinstance(error, dict)
        error["retry_after"] = self.retry_after
        return body


class ModelUnavailableError(LLMServiceError):
    status = 503
    type = "model_error"


class ModelLoadingError(ModelUnavailableError):
    """The tier is still loading: try again shortly (clients honour Retry-After)."""

    def __init__(self, tier: str, retry_after: float = 2) -> None:
        super().__init__(f"Tier {tier} is loading its model; retry shortly", code="model_loading")
        self.retry_after = retry_after


class StoreUnavailableError(LLMServiceError):
    status = 503
    type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="store_unavailable")


class UpstreamError(LLMServiceError):
    """A remote tier's upstream server failed, timed out, or answered what we cannot read."""

    status = 502
    type = "server_error"

    def __init__(self, message: str, *, code: str = "upstream_error") -> None:
        super().__init__(message, code=code)


class UpstreamUnavailableError(UpstreamError):
    status = 503

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, code="upstream_unavailable")
        self.retry_after = retry_after


class EngineError(LLMServiceError):
    """An engine raised something unexpected; details go to the log, not the client."""


@contextmanager
def engine_errors(engine: str) -> Iterator[None]:
    """Convert library exceptions (llama.cpp, MLX, torch) into our tree at the engine boundary."""
    try:
        yield
    except LLMServiceError:
        raise
    except (MemoryError, RuntimeError, ValueError, OSError, AssertionError) as exc:
        raise EngineError(f"The {engine} engine failed: {type(exc).__name__}") from exc
