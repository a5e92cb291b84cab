"""Request body limits (size and time), enforced before anything parses the body."""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.observe import request_id_of
from service.errors import FastAdaptError, Timeout, TooLarge, error_body, status_of


class BodyLimit:
    """413 for a body over ``max_bytes``: by its Content-Length, or by what actually arrives;
    408 (and the connection closed) for a body that has not arrived within ``timeout_s``.

    The body is read whole here (the JSON parser needs all of it anyway) and replayed.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        timeout_s: float = 30.0,
        paths: dict[str, int] | None = None,
    ) -> None:
        """``paths``: POST paths with their own limit (a meta-model upload's)."""
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.paths = paths or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        if scope["method"] == "POST":
            limit = self.paths.get(scope["path"], limit)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not _within(declared, limit):
            await self._refuse(scope, send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                await self._time_out(scope, send)
                return
            if message["type"] != "http.request":  # the client went away
                return
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, limit: int) -> None:
        await _answer(scope, send, TooLarge(f"the request body exceeds {limit} bytes"))

    async def _time_out(self, scope: Scope, send: Send) -> None:
        await _answer(
            scope, send, Timeout(f"the request body did not arrive within {self.timeout_s:g} s")
        )


async def _answer(scope: Scope, send: Send, error: FastAdaptError) -> None:
    """The error, with ``Connection: close``: the rest of the body may still be on its way
    (unread), so the connection cannot carry another request; the server closes it."""
    response = JSONResponse(  # rendered as every other error body is
        error_body(error.type, error.message, request_id_of(scope)),
        status_code=status_of(error),
        headers={"connection": "close"},
    )
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body})


def _within(declared: bytes, max_bytes: int) -> bool:
    """A Content-Length of at most ``max_bytes`` (digits only; too long for ``int``: no)."""
    return declared.isdigit() and len(declared) <= 18 and int(declared) <= max_bytes
