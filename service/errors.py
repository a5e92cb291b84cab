"""Domain errors, and the single table that maps them to HTTP status codes.

Every error reaches clients as ``{"error": {"type": ..., "message": ..., "request_id": ...}}``
(the request id is also the response's ``X-Request-ID``). This module
is a leaf: it imports nothing from the service, and nothing from FastAPI.
"""

from __future__ import annotations

from typing import Any, ClassVar


class FastAdaptError(Exception):
    """Base of every error a client may see; ``type`` is the stable, machine-readable name."""

    type: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unauthorized(FastAdaptError):
    """No API key, or one that is unknown or revoked (the answer carries
    ``WWW-Authenticate: Bearer``)."""

    type = "unauthorized"


class Forbidden(FastAdaptError):
    """A valid key whose scope does not allow the request."""

    type = "forbidden"


class NotFound(FastAdaptError):
    type = "not_found"


class InvalidInput(FastAdaptError):
    """A request value that cannot be used; the message starts with the field's name."""

    type = "invalid_input"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class AdaptationDiverged(InvalidInput):
    """An adaptation whose support loss ended higher than it started (or not finite): 422,
    nothing stored (README "Guardrails")."""

    type = "adaptation_diverged"


class TooLarge(FastAdaptError):
    type = "too_large"


class Conflict(FastAdaptError):
    """The request is valid but clashes with the stored state (e.g. a stale meta-model);
    ``retry_after`` (seconds), when set, says the clash will pass (a duplicate of a request
    still in flight) and the answer carries ``Retry-After``."""

    type = "conflict"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Timeout(FastAdaptError):
    """The request did not arrive in time (its body, within ``body_timeout_s``)."""

    type = "timeout"


class Unavailable(FastAdaptError):
    """The service cannot answer now; ``retry_after`` (seconds) says when to try again."""

    type = "unavailable"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(FastAdaptError):
    """The tenant is over its request rate; ``retry_after`` (whole seconds, >= 1) says when
    a request will be accepted again."""

    type = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


STATUS: dict[type[FastAdaptError], int] = {
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Timeout: 408,
    Conflict: 409,
    TooLarge: 413,
    InvalidInput: 422,
    RateLimited: 429,
    Unavailable: 503,
    FastAdaptError: 500,
}


def status_of(error: FastAdaptError) -> int:
    """The HTTP status of an error: its own class's entry, else its nearest base's."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(type_: str, message: str, request_id: str | None) -> dict[str, Any]:
    """The one error body; ``request_id`` is the response's ``X-Request-ID``."""
    return {"error": {"type": type_, "message": message, "request_id": request_id}}
