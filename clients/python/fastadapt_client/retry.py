"""When to try a request again, and after how long: decisions only, no I/O, so the sync and
async clients share them and tests need no clock.

- 429 and 503 are retried for every method: the server did not do the work. The wait is
  the response's ``Retry-After`` (seconds or an HTTP date), else an exponential backoff.
- No response at all (connection refused or reset, a timeout) is retried only for GET and
  DELETE: a POST may have been carried out before the connection dropped, and an
  adaptation is not idempotent (each one makes a new version).
- At most ``max_retries`` retries, and at most ``max_wait`` seconds of waiting in all: a
  ``Retry-After`` that would go past it ends the retries at once, and the error is raised.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from fastadapt_client.errors import retry_after

RETRY_STATUSES = frozenset({429, 503})
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

    def attempts(self, method: str) -> Attempts:
        return Attempts(self, method.upper())


class Attempts:
    """The retry state of one call: ask it after each try whether, and when, to go again."""

    def __init__(self, policy: RetryPolicy, method: str) -> None:
        self.policy = policy
        self.method = method
        self.retries = 0
        self.waited = 0.0

    def after_response(self, response: httpx.Response) -> float | None:
        """Seconds to wait before retrying, or None: the response is final."""
        if response.status_code not in RETRY_STATUSES:
            return None
        return self._next(retry_after(response))

    def after_error(self, error: httpx.TransportError) -> float | None:
        """Seconds to wait before retrying, or None: raise the error."""
        if self.method not in IDEMPOTENT_METHODS or not isinstance(error, RETRY_ERRORS):
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
