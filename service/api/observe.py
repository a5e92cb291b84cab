"""Request ids, request metrics and the access log: one pure ASGI middleware, outermost.

Every response carries ``X-Request-ID``: the caller's if it is sane (1-128 characters of
``[A-Za-z0-9._:-]``), else a new random one. The id is in ``scope["state"]`` (so
``request.state.request_id``) for the error handlers, which put it in the error body.
A 500 is sent by Starlette's outermost error middleware, past this one: its handler sets
the header itself (``service.api.errors``).

After each request: one count and one latency observation by route template (the matched
route's path, ``/v1/clients/{client_id}``; never the raw path, whose ids would make a
label per client; ``unmatched`` when no route matches), and one JSON line on the
``fastadapt.access`` logger. The line holds the time, the request id, the tenant (what
the auth dependency put in ``request.state.tenant_id``, else null), method, route
template, status and duration: never a header value, a query string or a body.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.metrics import Metrics

access_log = logging.getLogger("fastadapt.access")
log = logging.getLogger(__name__)

HEADER = b"x-request-id"
SANE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
UNMATCHED = "unmatched"  # the route label of a path no route matches
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def request_id_of(scope: Scope) -> str | None:
    """The id ``Observe`` gave this request (None outside it)."""
    state = scope.get("state")
    return None if state is None else state.get("request_id")


class Observe:
    """X-Request-ID on every response; metrics and an access-log line per request."""

    def __init__(
        self, app: ASGIApp, *, api: FastAPI, metrics: Metrics | None, access: bool
    ) -> None:
        self.app = app
        self.api = api  # its OpenAPI paths name unrouted requests (a 413 before routing)
        self.metrics = metrics
        self.access = access
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _request_id(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        header = (HEADER, request_id.encode())
        status = 500  # unless a response starts: the app raised, Starlette answers 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, request_id, status, time.perf_counter() - start)

    def _record(self, scope: Scope, request_id: str, status: int, seconds: float) -> None:
        route = self._route(scope)
        method = scope["method"] if scope["method"] in METHODS else "other"
        if self.metrics is not None:
            self.metrics.observe_request(route, method, status, seconds)
        if self.access and access_log.isEnabledFor(logging.INFO):
            line: dict[str, Any] = {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "request_id": request_id,
                "tenant": scope["state"].get("tenant_id"),
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000.0, 3),
            }
            access_log.info(json.dumps(line))

    def _route(self, scope: Scope) -> str:
        path = getattr(scope.get("route"), "path_format", None)  # set when a route matched
        if isinstance(path, str):
            return path
        # answered before routing (a 413), or no route matches (a 404): the documented
        # path that matches, if any
        if self._templates is None:
            try:
                paths = self.api.openapi().get("paths", {})
            except Exception:  # a label is not worth failing a response for
                log.exception("no route templates from the OpenAPI document")
                paths = {}
            self._templates = [(compile_path(p)[0], p) for p in paths]
        for regex, template in self._templates:
            if regex.match(scope["path"]):
                return template
        return UNMATCHED


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == HEADER:
            if SANE_ID.fullmatch(value):
                return value.decode()
            break
    # 128 random bits, as uuid4's, from the process's own generator (seeded from the OS at
    # start): an id must be unique, not secret, and uuid4's system call per request cost
    # a few percent of a prediction
    return f"{random.getrandbits(128):032x}"
