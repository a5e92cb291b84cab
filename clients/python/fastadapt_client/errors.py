"""Exceptions: the server's ``{"error": {"type", "message", "request_id"}}`` body as types.

Every exception the client raises on purpose derives from ``FastAdaptError``:

- ``APIError`` (and its subclasses by status) when the server answered an error status;
- ``TransportError`` when no answer came (connection refused or reset, a timeout); the
  httpx exception is its ``__cause__``.

Messages carry the server's message and the request id, never a request body or a key.
"""

from __future__ import annotations

import email.utils
import math
import time
from typing import Any, ClassVar

import httpx

REQUEST_ID_HEADER = "X-Request-ID"


class FastAdaptError(Exception):
    """Base of every error this client raises. ``status`` is None when no answer came."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str = "error",
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.request_id = request_id

    def __str__(self) -> str:
        head = f"{self.status} {self.type}" if self.status is not None else self.type
        tail = f" (request id {self.request_id})" if self.request_id else ""
        return f"{head}: {self.message}{tail}"


class TransportError(FastAdaptError):
    """No response: the connection failed, was reset, or timed out (see ``__cause__``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="transport")


class APIError(FastAdaptError):
    """The server answered an error status; the subclasses below name the common ones."""

    status: int
    status_code: ClassVar[int | None] = None

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type: str,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, type=type, request_id=request_id)
        self.retry_after = retry_after  # seconds, from Retry-After, when the server sent it


class Unauthorized(APIError):
    """401: no API key, or one the server does not know (or has revoked)."""

    status_code = 401


class Forbidden(APIError):
    """403: the key's scope does not allow this request."""

    status_code = 403


class NotFound(APIError):
    """404: no such client, version or meta-model (for this tenant)."""

    status_code = 404


class Conflict(APIError):
    """409: the request clashes with the stored state (a stale meta-model, say)."""

    status_code = 409


class PayloadTooLarge(APIError):
    """413: the body, a support set or an image exceeds a server limit."""

    status_code = 413


class InvalidInput(APIError):
    """422: a value the server cannot use; the message starts with the field's name."""

    status_code = 422


class RateLimited(APIError):
    """429: the tenant's rate limit; ``retry_after`` says when to try again."""

    status_code = 429


class Unavailable(APIError):
    """503: the service cannot answer now (database down, queue full)."""

    status_code = 503


BY_STATUS: dict[int, type[APIError]] = {
    cls.status_code: cls
    for cls in (
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        InvalidInput,
        RateLimited,
        Unavailable,
    )
    if cls.status_code is not None
}


def from_response(response: httpx.Response) -> APIError:
    """The exception for an error response; a body not in the server's shape (a proxy's
    page, say) gives the reason phrase, never the body's text."""
    status = response.status_code
    type_, message, request_id = "http_error", f"HTTP {status} {response.reason_phrase}", None
    detail = _error_detail(response)
    if detail is not None:
        if isinstance(detail.get("type"), str):
            type_ = detail["type"]
        if isinstance(detail.get("message"), str):
            message = detail["message"]
        if isinstance(detail.get("request_id"), str):
            request_id = detail["request_id"]
    request_id = request_id or response.headers.get(REQUEST_ID_HEADER)
    cls = BY_STATUS.get(status, APIError)
    return cls(
        message,
        status=status,
        type=type_,
        request_id=request_id,
        retry_after=retry_after(response),
    )


def _error_detail(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:  # not JSON (json.JSONDecodeError and UnicodeDecodeError both are)
        return None
    detail = body.get("error") if isinstance(body, dict) else None
    return detail if isinstance(detail, dict) else None


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date); None if absent or bad."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
