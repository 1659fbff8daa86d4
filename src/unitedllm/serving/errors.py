"""Serving errors; each maps to one OpenAI error shape and HTTP status in :mod:`unitedllm.serving.api`.

::

    UnitedLLMError
    └── ServingError          a request or a model cannot be served (400)
        ├── ModelNotFound     the request's ``model`` names no adapter of this server (404)
        ├── AdapterRefused    an adapter failed its checks (digest, shapes, NaN) and was not loaded (503)
        ├── Overloaded        the queue is full (429)
        ├── GenerationTimeout a request ran past its time limit (503)
        ├── GenerationFailed  the engine failed while generating (500)
        └── Unauthorized      the API key is missing or wrong (401)
"""

from __future__ import annotations

from unitedllm.errors import UnitedLLMError

__all__ = [
    "AdapterRefused",
    "GenerationFailed",
    "GenerationTimeout",
    "ModelNotFound",
    "Overloaded",
    "ServingError",
]


class ServingError(UnitedLLMError):
    """A request or a model cannot be served; ``param`` names the request field at fault."""

    status = 400
    kind = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        self.param = param
        super().__init__(message)


class ModelNotFound(ServingError):
    """The request's ``model`` names no adapter this server knows."""

    status = 404
    code = "model_not_found"

    def __init__(self, name: str, known: list[str]):
        self.name = name
        shown = ", ".join(known[:8]) + (" ..." if len(known) > 8 else "")
        super().__init__(f"model {name!r} does not exist on this server (known: {shown})", param="model")


class AdapterRefused(ServingError):
    """An adapter failed its checks and was not loaded; what was serving keeps serving."""

    status = 503
    kind = "server_error"
    code = "adapter_refused"

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"adapter {path} refused: {reason}")


class Overloaded(ServingError):
    """Too many requests are waiting; the client should retry later."""

    status = 429
    kind = "rate_limit_error"
    code = "queue_full"


class GenerationTimeout(ServingError):
    """A request waited and generated for longer than the server's per-request limit."""

    status = 503
    kind = "server_error"
    code = "timeout"


class GenerationFailed(ServingError):
    """The engine failed while generating; the message says why, the server keeps running."""

    status = 500
    kind = "server_error"
    code = "generation_failed"


class Unauthorized(ServingError):
    """The request has no API key, or not one this server accepts."""

    status = 401
    code = "invalid_api_key"
