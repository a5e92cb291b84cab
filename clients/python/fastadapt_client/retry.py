"""When to try a request again, and after how long: decisions only, no I/O, so the sync and
async clients share them and tests need no clock.

- 429 and 503 are retried for every method: the server did not do the work. The wait is
  the response's ``Retry-After`` (seconds or an HTTP date), else an exponential backoff.
- No response at all (connection refused or reset, a timeout) is retried only for GET and
  DELETE, and for a POST sent with an ``Idempotency-Key`` (``adapt`` and ``readapt`` send
  one, the same on every retry): any other POST may have been carried out before the
  connection dropped, and a second one would do it again.
- 409 with ``Retry-After`` is retried for a keyed POST: the server is still carrying out
  the first try (the one whose connection dropped); the retry then gets its response.
- At most ``max_retries`` retries, and at most ``max_wait`` seconds of waiting in all: a
  ``Retry-After`` that would go past it ends the retries at once, and the error is raised.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from fastadapt_client.errors import retry_after

RETRY_STATUSES = frozenset({429, 503})
IN_PROGRESS = 409  # with Retry-After, to a keyed POST: its first try is still running
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
# Failures to get a response at all; an httpx.UnsupportedProtocol or a bad URL is not one.
RETRY_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 2  # retries after the first try; 0 turns retrying off
    max_wait: float = 30.0  # seconds of waiting, summed over the retries of one call
    backoff: float = 0.5  # first wait when the server names none; doubles each retry
    max_backoff: float = 8.0  # the longest such wait

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.max_wait < 0:
            raise ValueError("max_wait must be >= 0")

    def attempts(self, method: str, *, keyed: bool = False) -> Attempts:
        """The retry state of one call; ``keyed``: a POST with an ``Idempotency-Key``."""
        return Attempts(self, method.upper(), keyed=keyed)


class Attempts:
    """The retry state of one call: ask it after each try whether, and when, to go again."""

    def __init__(self, policy: RetryPolicy, method: str, *, keyed: bool = False) -> None:
        self.policy = policy
        self.method = method
        self.keyed = keyed  # sent with an Idempotency-Key: the server does it at most once
        self.retries = 0
        self.waited = 0.0

    def after_response(self, response: httpx.Response) -> float | None:
        """Seconds to wait before retrying, or None: the response is final."""
        asked = retry_after(response)
        in_progress = self.keyed and response.status_code == IN_PROGRESS and asked is not None
        if response.status_code not in RETRY_STATUSES and not in_progress:
            return None
        return self._next(asked)

    def after_error(self, error: httpx.TransportError) -> float | None:
        """Seconds to wait before retrying, or None: raise the error."""
        safe = self.method in IDEMPOTENT_METHODS or self.keyed
        if not safe or not isinstance(error, RETRY_ERRORS):
            return None
        return self._next(None)

    def _next(self, asked: float | None) -> float | None:
        if self.retries >= self.policy.max_retries:
            return None
        if asked is None:
            asked = min(self.policy.backoff * 2**self.retries, self.policy.max_backoff)
        if self.waited + asked > self.policy.max_wait:
            return None
        self.retries += 1
        self.waited += asked
        return asked
