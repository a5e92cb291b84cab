"""Exception handlers: every error leaves as ``{"error": {"type", "message", "request_id"}}``,
the request id being the response's ``X-Request-ID`` (``service.api.observe``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.api.observe import request_id_of
from service.api.schemas import UNION_TAGS
from service.errors import (
    Conflict,
    FastAdaptError,
    InvalidInput,
    RateLimited,
    Unauthorized,
    Unavailable,
    error_body,
    status_of,
)

log = logging.getLogger(__name__)
HTTP_TYPES = {404: "not_found", 405: "method_not_allowed"}
SHOWN_PROBLEMS = 5


def install(app: FastAPI) -> None:
    app.add_exception_handler(FastAdaptError, _domain)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal)


def _respond(
    request: Request,
    status: int,
    type_: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = error_body(type_, message, request_id_of(request.scope))
    return JSONResponse(body, status_code=status, headers=headers)


async def _domain(request: Request, exc: FastAdaptError) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, Unavailable | Conflict) and exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    elif isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return _respond(request, status_of(exc), exc.type, exc.message, headers or None)


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [_describe(error) for error in exc.errors()]
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type and any(e.get("loc") == ("body",) for e in exc.errors()):
        problems.insert(
            0, f"body: send JSON with Content-Type: application/json, not {content_type!r}"
        )
    message = "; ".join(problems[:SHOWN_PROBLEMS])
    if len(problems) > SHOWN_PROBLEMS:
        message += f"; and {len(problems) - SHOWN_PROBLEMS} more"
    return _respond(request, 422, InvalidInput.type, message)


async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 400:  # FastAPI could not read the body as JSON: 422, as for bad JSON
        return _respond(request, 422, InvalidInput.type, _unreadable(exc.__cause__))
    type_ = HTTP_TYPES.get(exc.status_code, "http_error")
    message = str(exc.detail)
    if exc.status_code == 404:  # no route matched (the routes raise NotFound themselves)
        path = request.url.path
        message = f"no route for {request.method} {path}"
        if path.endswith("/") and path != "/":
            message += ": paths take no trailing slash"
    return _respond(request, exc.status_code, type_, message, exc.headers)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    """500, with ``Connection: close``: Starlette re-raises the error after this response
    and the server then closes the connection; the header tells a pooled client so, and
    it opens a new connection for its next request instead of meeting a reset. Starlette's
    outermost middleware sends this one, past ``Observe``: the request id header is set
    here."""
    request_id = request_id_of(request.scope)
    log.exception("unhandled error (request %s)", request_id, exc_info=exc)
    headers = {"Connection": "close"}
    if request_id:
        headers["X-Request-ID"] = request_id
    return _respond(request, 500, FastAdaptError.type, "internal server error", headers)


def _unreadable(cause: BaseException | None) -> str:
    """Why a body is not JSON, without quoting it."""
    if isinstance(cause, UnicodeDecodeError):
        return "body: not UTF-8 text; send JSON encoded as UTF-8"
    if isinstance(cause, RecursionError):
        return "body: JSON nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):  # int's max_str_digits
        return f"body: a number with more than {sys.get_int_max_str_digits()} digits"
    return "body: not valid JSON"


def _describe(error: Any) -> str:
    """``support.inputs[0][1]: Input should be a finite number``."""
    if error.get("type") == "json_invalid":
        detail = error.get("ctx", {}).get("error", "")
        return f"body: invalid JSON ({detail}) at character {error['loc'][-1]}"
    return f"{_field(error.get('loc', ()))}: {error.get('msg', 'invalid')}"


def _field(loc: Sequence[int | str]) -> str:
    parts = list(loc)
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    name = ""
    for part in parts:
        if part in UNION_TAGS:  # which branch of an input/target union; not a field
            continue
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"
