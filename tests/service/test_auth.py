"""Keys, the trusted-key cache, the token buckets and when keys are needed, on their own."""

from __future__ import annotations

import pytest

from service import auth
from service.auth import Guard, KeyCache, Principal, TokenBuckets
from service.errors import InvalidInput, RateLimited
from service.settings import Settings, is_loopback

ACME = Principal(tenant_id="acme", scope="client", key_id="key_0123456789abcdef")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_tokens_are_256_random_bits_and_stored_as_sha256() -> None:
    tokens = {auth.new_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert token.startswith("fa_") and len(token) == auth.TOKEN_LENGTH == 46
        assert auth.well_formed(token)
        assert len(auth.token_hash(token)) == 64 and token not in auth.token_hash(token)
    assert not auth.well_formed("fa_short")
    assert not auth.well_formed("xx_" + "a" * 43)
    assert not auth.well_formed("fa_" + "a" * 42 + "!")


@pytest.mark.parametrize("tenant", ["acme", "a", "tenant-2_b", "0" * 64])
def test_tenant_names(tenant: str) -> None:
    assert auth.check_tenant(tenant) == tenant


@pytest.mark.parametrize("tenant", ["", "Acme", "-acme", ".", "..", "a/b", "a b", "0" * 65])
def test_bad_tenant_names(tenant: str) -> None:
    with pytest.raises(InvalidInput, match=r"^tenant: "):
        auth.check_tenant(tenant)


def test_the_cache_trusts_a_key_for_ttl_seconds_only() -> None:
    clock = Clock()
    cache = KeyCache(2.0, clock=clock)
    cache.put("digest", ACME)
    clock.now += 1.99
    assert cache.get("digest") == ACME
    clock.now += 0.01
    assert cache.get("digest") is None  # read again from the database
    assert cache.get("other") is None


def test_a_zero_ttl_caches_nothing_and_the_cache_is_bounded() -> None:
    off = KeyCache(0.0)
    off.put("digest", ACME)
    assert off.get("digest") is None
    small = KeyCache(10.0, max_entries=2)
    for digest in ("a", "b", "c"):
        small.put(digest, ACME)
    assert [small.get(d) for d in ("a", "b", "c")] == [None, ACME, ACME]


def test_the_bucket_allows_the_burst_then_the_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        buckets.take("acme")
    with pytest.raises(RateLimited) as refused:
        buckets.take("acme")
    assert refused.value.retry_after == 1  # half a second, rounded up
    buckets.take("other")  # tenants have their own buckets
    clock.now += 0.5
    buckets.take("acme")  # one token came back
    with pytest.raises(RateLimited):
        buckets.take("acme")
    clock.now += 100
    for _ in range(3):  # never more than the burst saved up
        buckets.take("acme")
    with pytest.raises(RateLimited):
        buckets.take("acme")


def test_retry_after_is_the_wait_for_one_token_rounded_up() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=0.25, burst=1, clock=clock)
    buckets.take("acme")
    clock.now += 1.0  # a quarter of a token back: three quarters missing, 3 s at 0.25/s
    with pytest.raises(RateLimited) as refused:
        buckets.take("acme")
    assert refused.value.retry_after == 3


def test_a_zero_rate_is_no_limit() -> None:
    buckets = TokenBuckets(rate=0.0, burst=1)
    for _ in range(1000):
        buckets.take("acme")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_keys_are_never_off_on_a_public_bind_address() -> None:
    assert not Settings(host="127.0.0.1").auth_required
    assert Settings(host="127.0.0.1", auth="required").auth_required
    assert Settings(host="0.0.0.0").auth_required
    assert Settings(host="0.0.0.0", auth="auto").auth_required
    with pytest.raises(ValueError):
        Settings(auth="off")  # type: ignore[arg-type]


def test_a_request_on_a_public_address_needs_a_key_whatever_the_settings() -> None:
    guard = Guard(Settings(host="127.0.0.1"))
    assert not guard.required_for(("127.0.0.1", 8000))
    assert not guard.required_for(("::1", 8000))
    assert not guard.required_for(None)  # a Unix socket
    assert not guard.required_for(("testserver", 80))  # the in-process test client
    assert guard.required_for(("10.0.0.5", 8000))  # e.g. uvicorn --host 0.0.0.0 by hand
    assert Guard(Settings(auth="required")).required_for(("127.0.0.1", 8000))
