"""``Client`` and ``AsyncClient``: the same methods, sync and async.

Both build each request with ``calls`` (shared), decide retries with ``retry`` (shared)
and map errors with ``errors`` (shared); what differs is only whether they await.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from fastadapt_client import calls
from fastadapt_client.calls import IDEMPOTENCY_KEY, Call
from fastadapt_client.errors import REQUEST_ID_HEADER, FastAdaptError, TransportError, from_response
from fastadapt_client.inputs import ImageInput, NumericInput
from fastadapt_client.models import (
    AdaptResponse,
    BulkAdaptationItem,
    BulkAdaptationResponse,
    BulkPredictionItem,
    BulkPredictionResponse,
    ClientList,
    ClientResponse,
    ClientSummary,
    MetaModelResponse,
    PredictionResponse,
    VersionList,
    VersionResponse,
)
from fastadapt_client.retry import RetryPolicy

__version__ = "0.1.0"
T = TypeVar("T")
DEFAULT_TIMEOUT_S = 60.0  # an adaptation of a large support set takes seconds


class _Base:
    """What both clients share: the base URL, the headers, the retry policy, and reading
    a final response."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        max_retry_wait: float,
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("base_url is an http:// or https:// URL, e.g. http://127.0.0.1:8000")
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(max_retries=max_retries, max_wait=max_retry_wait)
        self._timeout = timeout
        self._headers = {
            "Accept": "application/json",
            "User-Agent": f"fastadapt-client/{__version__}",
        }
        if api_key is not None:
            if not api_key or any(c in api_key for c in "\r\n"):
                raise ValueError("api_key must be a non-empty single-line token")
            self._headers["Authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}({self.base_url!r})"

    def _request(self, call: Call[Any]) -> dict[str, Any]:
        """Keyword arguments of ``httpx.Client.request`` for ``call``."""
        return {
            "method": call.method,
            "url": self.base_url + call.path,
            "json": call.json,
            "headers": {**self._headers, **call.headers} if call.headers else self._headers,
            "timeout": self._timeout,
        }

    @staticmethod
    def _finish(call: Call[T], response: httpx.Response) -> T:
        if response.is_error:
            raise from_response(response)
        try:
            return call.parse(response)
        except ValueError as exc:  # pydantic's ValidationError is one
            raise FastAdaptError(
                f"the server's answer to {call.method} {call.path} is not what this client "
                "reads (is the server newer or older than the client?)",
                status=response.status_code,
                type="invalid_response",
                request_id=response.headers.get(REQUEST_ID_HEADER),
            ) from exc

    @staticmethod
    def _transport_error(call: Call[Any], error: httpx.TransportError) -> TransportError:
        return TransportError(f"{call.method} {call.path}: {type(error).__name__}: {error}")


class Client(_Base):
    """A synchronous client of the fastadapt API.

    ``Client("http://127.0.0.1:8000", api_key=...)``; use it as a context manager (or
    call ``close``) to release its connections. ``http_client`` or ``transport`` replace
    the httpx client it would make (an injected ``http_client`` is not closed here);
    ``sleep`` is what waits between retries.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT_S,
        max_retries: int = 2,
        max_retry_wait: float = 30.0,
        http_client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_wait=max_retry_wait,
        )
        if http_client is not None and transport is not None:
            raise ValueError("give http_client or transport, not both")
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(transport=transport)
        self._sleep = sleep

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def send(self, call: Call[T]) -> T:
        """Send a call, retrying as the policy allows (see ``retry``); raise its error."""
        attempts = self.retry.attempts(call.method, keyed=IDEMPOTENCY_KEY in call.headers)
        while True:
            try:
                response = self._http.request(**self._request(call))
            except httpx.TransportError as error:
                delay = attempts.after_error(error)
                if delay is None:
                    raise self._transport_error(call, error) from error
            else:
                delay = attempts.after_response(response)
                if delay is None:
                    return self._finish(call, response)
            self._sleep(delay)

    # -- the API -----------------------------------------------------------------------------
    def list_meta_models(self) -> list[MetaModelResponse]:
        """The loaded meta-models."""
        return self.send(calls.list_meta_models())

    def get_meta_model(self, name: str) -> MetaModelResponse:
        return self.send(calls.get_meta_model(name))

    def adapt(
        self,
        client_id: str,
        *,
        meta_model: str,
        targets: Sequence[float | int | str] | Any,
        inputs: Sequence[NumericInput] | Any | None = None,
        images: Sequence[ImageInput] | None = None,
        inner_steps: int | None = None,
        inner_lr: float | None = None,
        out_of_scope_threshold: float | None = None,
        idempotency_key: str | None = None,
    ) -> AdaptResponse:
        """Adapt ``meta_model`` to a support set: ``inputs`` (rows or arrays of numbers, or
        texts for a text meta-model) or ``images`` (file paths or bytes), and ``targets``
        (numbers, or string or integer labels); ``out_of_scope_threshold`` (text
        meta-models) is stored with the version. The result is the client's new version.
        Sent with an ``Idempotency-Key`` (``idempotency_key``, or a fresh one per call), so
        retries after a lost connection are safe: the server adapts once and answers every
        retry with that version."""
        return self.send(
            calls.adapt(
                client_id,
                meta_model=meta_model,
                targets=targets,
                inputs=inputs,
                images=images,
                inner_steps=inner_steps,
                inner_lr=inner_lr,
                out_of_scope_threshold=out_of_scope_threshold,
                idempotency_key=idempotency_key,
            )
        )

    def predict(
        self,
        client_id: str,
        *,
        inputs: Sequence[NumericInput] | Any | None = None,
        images: Sequence[ImageInput] | None = None,
        version: int | None = None,
        out_of_scope_threshold: float | None = None,
    ) -> PredictionResponse:
        """Predictions of the current version (or of ``version``) for numbers, images or
        texts. Text meta-models answer an in-scope score per input, and no label (None)
        below ``out_of_scope_threshold`` (default: the version's, else the meta-model's)."""
        return self.send(
            calls.predict(
                client_id,
                inputs=inputs,
                images=images,
                version=version,
                out_of_scope_threshold=out_of_scope_threshold,
            )
        )

    def predict_batch(
        self, requests: Sequence[BulkPredictionItem | Mapping[str, Any]]
    ) -> BulkPredictionResponse:
        """Many clients' predictions in one request (``POST /v1/predictions:batch``): one
        result per item, in order, a ``PredictionResponse`` or a ``BulkItemFailure``."""
        return self.send(calls.predict_batch(requests))

    def adapt_batch(
        self, adaptations: Sequence[BulkAdaptationItem | Mapping[str, Any]]
    ) -> BulkAdaptationResponse:
        """Many clients' adaptations in one request (``POST /v1/adaptations:batch``): one
        result per item, in order, an ``AdaptResponse`` or a ``BulkItemFailure``."""
        return self.send(calls.adapt_batch(adaptations))

    def history(self, client_id: str) -> ClientResponse:
        """The client's current version and every version (no parameters, no support sets)."""
        return self.send(calls.history(client_id))

    def readapt(
        self,
        client_id: str,
        *,
        version: int | None = None,
        inner_steps: int | None = None,
        inner_lr: float | None = None,
        out_of_scope_threshold: float | None = None,
        idempotency_key: str | None = None,
    ) -> AdaptResponse:
        """Adapt a stored support set (the current version's, or ``version``'s) again;
        keyed, and so safely retried, as ``adapt``."""
        return self.send(
            calls.readapt(
                client_id,
                version=version,
                inner_steps=inner_steps,
                inner_lr=inner_lr,
                out_of_scope_threshold=out_of_scope_threshold,
                idempotency_key=idempotency_key,
            )
        )

    def delete(self, client_id: str) -> None:
        """Delete the client: every version and support set."""
        return self.send(calls.delete(client_id))

    # -- client versions ---------------------------------------------------------------------
    def list_clients(
        self, *, meta_model: str | None = None, stale: bool = False, page_size: int | None = None
    ) -> Iterator[ClientSummary]:
        """Every client of the tenant, by client id, fetched a page (``page_size``, the
        server's default 50) at a time as the iteration reaches it. ``meta_model``: only
        clients whose current version is of it; ``stale``: only those on an older version
        of their meta-model than the one new adaptations use."""
        cursor: str | None = None
        while True:
            page = self.clients_page(
                meta_model=meta_model, stale=stale, limit=page_size, cursor=cursor
            )
            yield from page.clients
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def clients_page(
        self,
        *,
        meta_model: str | None = None,
        stale: bool = False,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> ClientList:
        """One page of ``list_clients``; pass its ``next_cursor`` back for the next."""
        return self.send(
            calls.list_clients(limit=limit, cursor=cursor, meta_model=meta_model, stale=stale)
        )

    def versions(
        self, client_id: str, *, page_size: int | None = None
    ) -> Iterator[VersionResponse]:
        """The client's stored versions, newest first, a page at a time as iterated."""
        cursor: str | None = None
        while True:
            page = self.versions_page(client_id, limit=page_size, cursor=cursor)
            yield from page.versions
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def versions_page(
        self, client_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> VersionList:
        """One page of ``versions``; pass its ``next_cursor`` back for the next."""
        return self.send(calls.versions(client_id, limit=limit, cursor=cursor))

    def rollback(self, client_id: str, *, version: int) -> AdaptResponse:
        """Make ``version`` current again, as a new version that copies it."""
        return self.send(calls.rollback(client_id, version=version))

    def add_examples(
        self,
        client_id: str,
        *,
        targets: Sequence[float | int | str] | Any,
        inputs: Sequence[NumericInput] | Any | None = None,
        images: Sequence[ImageInput] | None = None,
        inner_steps: int | None = None,
        inner_lr: float | None = None,
        out_of_scope_threshold: float | None = None,
    ) -> AdaptResponse:
        """Add examples to the current support set and adapt the whole set anew: the
        result is the client's new version. Never retried after a lost connection."""
        return self.send(
            calls.add_examples(
                client_id,
                targets=targets,
                inputs=inputs,
                images=images,
                inner_steps=inner_steps,
                inner_lr=inner_lr,
                out_of_scope_threshold=out_of_scope_threshold,
            )
        )


class AsyncClient(_Base):
    """The asynchronous twin of ``Client``: the same arguments and methods, awaited.

    ``sleep`` is an async function (``asyncio.sleep`` unless injected).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT_S,
        max_retries: int = 2,
        max_retry_wait: float = 30.0,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_wait=max_retry_wait,
        )
        if http_client is not None and transport is not None:
            raise ValueError("give http_client or transport, not both")
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(transport=transport)
        self._sleep = sleep

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def send(self, call: Call[T]) -> T:
        """Send a call, retrying as the policy allows (see ``retry``); raise its error."""
        attempts = self.retry.attempts(call.method, keyed=IDEMPOTENCY_KEY in call.headers)
        while True:
            try:
                response = await self._http.request(**self._request(call))
            except httpx.TransportError as error:
                delay = attempts.after_error(error)
                if delay is None:
                    raise self._transport_error(call, error) from error
            else:
                delay = attempts.after_response(response)
                if delay is None:
                    return self._finish(call, response)
            await self._sleep(delay)

    # -- the API (see Client for each method's contract) -------------------------------------
    async def list_meta_models(self) -> list[MetaModelResponse]:
        return await self.send(calls.list_meta_models())

    async def get_meta_model(self, name: str) -> MetaModelResponse:
        return await self.send(calls.get_meta_model(name))

    async def adapt(
        self,
        client_id: str,
        *,
        meta_model: str,
        targets: Sequence[float | int | str] | Any,
        inputs: Sequence[NumericInput] | Any | None = None,
        images: Sequence[ImageInput] | None = None,
        inner_steps: int | None = None,
        inner_lr: float | None = None,
        out_of_scope_threshold: float | None = None,
        idempotency_key: str | None = None,
    ) -> AdaptResponse:
        return await self.send(
            calls.adapt(
                client_id,
                meta_model=meta_model,
                targets=targets,
                inputs=inputs,
                images=images,
                inner_steps=inner_steps,
                inner_lr=inner_lr,
                out_of_scope_threshold=out_of_scope_threshold,
                idempotency_key=idempotency_key,
            )
        )

    async def predict(
        self,
        client_id: str,
        *,
        inputs: Sequence[NumericInput] | Any | None = None,
        images: Sequence[ImageInput] | None = None,
        version: int | None = None,
        out_of_scope_threshold: float | None = None,
    ) -> PredictionResponse:
        return await self.send(
            calls.predict(
                client_id,
                inputs=inputs,
                images=images,
                version=version,
                out_of_scope_threshold=out_of_scope_threshold,
            )
        )

    async def predict_batch(
        self, requests: Sequence[BulkPredictionItem | Mapping[str, Any]]
    ) -> BulkPredictionResponse:
        """Many clients' predictions in one request (``POST /v1/predictions:batch``): one
        result per item, in order, a ``PredictionResponse`` or a ``BulkItemFailure``."""
        return await self.send(calls.predict_batch(requests))

    async def adapt_batch(
        self, adaptations: Sequence[BulkAdaptationItem | Mapping[str, Any]]
    ) -> BulkAdaptationResponse:
        """Many clients' adaptations in one request (``POST /v1/adaptations:batch``): one
        result per item, in order, an ``AdaptResponse`` or a ``BulkItemFailure``."""
        return await self.send(calls.adapt_batch(adaptations))

    async def history(self, client_id: str) -> ClientResponse:
        return await self.send(calls.history(client_id))

    async def readapt(
        self,
        client_id: str,
        *,
        version: int | None = None,
        inner_steps: int | None = None,
        inner_lr: float | None = None,
        out_of_scope_threshold: float | None = None,
        idempotency_key: str | None = None,
    ) -> AdaptResponse:
        return await self.send(
            calls.readapt(
                client_id,
                version=version,
                inner_steps=inner_steps,
                inner_lr=inner_lr,
                out_of_scope_threshold=out_of_scope_threshold,
                idempotency_key=idempotency_key,
            )
        )

    async def delete(self, client_id: str) -> None:
        return await self.send(calls.delete(client_id))

    async def list_clients(
        self, *, meta_model: str | None = None, stale: bool = False, page_size: int | None = None
    ) -> AsyncIterator[ClientSummary]:
        cursor: str | None = None
        while True:
            page = await self.clients_page(
                meta_model=meta_model, stale=stale, limit=page_size, cursor=cursor
            )
            for client in page.clients:
                yield client
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def clients_page(
        self,
        *,
        meta_model: str | None = None,
        stale: bool = False,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> ClientList:
        return await self.send(
            calls.list_clients(limit=limit, cursor=cursor, meta_model=meta_model, stale=stale)
        )

    async def versions(
        self, client_id: str, *, page_size: int | None = None
    ) -> AsyncIterator[VersionResponse]:
        cursor: str | None = None
        while True:
            page = await self.versions_page(client_id, limit=page_size, cursor=cursor)
            for version in page.versions:
                yield version
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def versions_page(
        self, client_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> VersionList:
        return await self.send(calls.versions(client_id, limit=limit, cursor=cursor))

    async def rollback(self, client_id: str, *, version: int) -> AdaptResponse:
        return await self.send(calls.rollback(client_id, version=version))

    async def add_examples(
        self,
        client_id: str,
        *,
        targets: Sequence[float | int | str] | Any,
        inputs: Sequence[NumericInput] | Any | None = None,
        images: Sequence[ImageInput] | None = None,
        inner_steps: int | None = None,
        inner_lr: float | None = None,
        out_of_scope_threshold: float | None = None,
    ) -> AdaptResponse:
        return await self.send(
            calls.add_examples(
                client_id,
                targets=targets,
                inputs=inputs,
                images=images,
                inner_steps=inner_steps,
                inner_lr=inner_lr,
                out_of_scope_threshold=out_of_scope_threshold,
            )
        )
