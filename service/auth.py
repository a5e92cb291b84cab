"""API keys, who a request is, and the per-process state of authentication.

A key is ``fa_`` + 43 characters (32 random bytes, urlsafe base64): 256 bits of entropy,
so a single SHA-256 is a sound way to store it (a slow password hash only helps secrets
that can be guessed). The database keeps the hash; a lookup is by hash, then the hashes
are compared in constant time. This module is a leaf beside ``settings`` and ``errors``:
no FastAPI, no SQLAlchemy.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from service.errors import InvalidInput, RateLimited
from service.settings import Settings

Scope = Literal["client", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
TOKEN_PREFIX = "fa_"
TOKEN_BYTES = 32  # 256 bits
TOKEN_LENGTH = len(TOKEN_PREFIX) + math.ceil(TOKEN_BYTES * 4 / 3)  # unpadded base64: 46
KEY_ID_PREFIX = "key_"
KEY_ID_PATTERN = r"^key_[0-9a-f]{16}$"
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_TENANT = re.compile(TENANT_PATTERN)
_TOKEN = re.compile(r"^fa_[A-Za-z0-9_-]{43}$")

Clock = Callable[[], float]


@dataclass(frozen=True)
class Principal:
    """Who is asking: a tenant, with a scope; ``key_id`` is None when auth is off."""

    tenant_id: str
    scope: Scope
    key_id: str | None

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def new_key_id() -> str:
    return KEY_ID_PREFIX + secrets.token_hex(8)


def token_hash(token: str) -> str:
    """The stored form of a key: SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def well_formed(token: str) -> bool:
    """Could this be one of our keys? (Saves a database lookup for garbage.)"""
    return len(token) == TOKEN_LENGTH and _TOKEN.match(token) is not None


def check_tenant(tenant_id: str) -> str:
    if not _TENANT.match(tenant_id):
        raise InvalidInput(
            "tenant", "1-64 characters of [a-z0-9_-], starting with a letter or digit"
        )
    return tenant_id


def check_scope(scope: str) -> Scope:
    if scope not in SCOPES:
        raise InvalidInput("scope", f"one of {', '.join(SCOPES)}")
    return scope


class KeyCache:
    """Keys this process has looked up successfully, trusted for ``ttl_s`` and then read
    again: a revoked key is refused on every replica at most ``ttl_s`` after revocation.
    Entries are keyed by the token's hash, never by the token. Event-loop only."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000, clock: Clock = time.monotonic):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()

    def get(self, digest: str) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        expires, principal = entry
        if self.clock() >= expires:
            del self._entries[digest]
            return None
        return principal

    def put(self, digest: str, principal: Principal) -> None:
        if self.ttl_s <= 0:
            return
        self._entries[digest] = (self.clock() + self.ttl_s, principal)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class TokenBuckets:
    """One token bucket per tenant: ``rate`` tokens a second, at most ``burst`` saved up;
    a request takes one. Per process (replicas each allow the rate). Event-loop only."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant: (tokens, at)

    def take(self, tenant_id: str) -> None:
        """Take a token from the tenant's bucket, or raise ``RateLimited``."""
        if self.rate <= 0:
            return
        now = self.clock()
        tokens, at = self._buckets.get(tenant_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[tenant_id] = (tokens, now)
            wait = max(1, math.ceil((1.0 - tokens) / self.rate))
            raise RateLimited(
                f"over the rate limit of {self.rate:g} requests per second; retry in {wait} s",
                retry_after=wait,
            )
        self._buckets[tenant_id] = (tokens - 1.0, now)


class Guard:
    """A process's authentication state: whether keys are needed, the trusted-key cache
    and the tenants' rate limits (the app keeps one; routes reach it via ``api/deps``)."""

    def __init__(self, settings: Settings, clock: Clock = time.monotonic) -> None:
        self.required = settings.auth_required
        self.keys = KeyCache(settings.auth_cache_s, clock=clock)
        # key digest -> the lookup in progress, which the requests that miss share
        self.lookups: dict[str, asyncio.Future[Principal]] = {}
        self.limits = TokenBuckets(settings.rate_limit_rps, settings.rate_limit_burst, clock)

    def required_for(self, server: tuple[str, int | None] | None) -> bool:
        """Keys are needed when the settings say so, and also whenever a request arrived
        on a non-loopback address (an app served by hand on ``0.0.0.0`` with the default
        settings). ``server`` is the ASGI scope's: the connection's local address."""
        if self.required:
            return True
        if not server:  # a Unix socket
            return False
        try:
            return not ipaddress.ip_address(server[0]).is_loopback
        except ValueError:  # not an address: the in-process test client's "testserver"
            return False
