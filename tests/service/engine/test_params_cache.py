"""The adapted-params cache: LRU by bytes, counters, forget, and loads racing a forget."""

from __future__ import annotations

import torch
from torch import Tensor

from service.engine.cache import ParamsCache


def params(value: float, n: int = 10) -> Tensor:
    """A client version's flat params, as the engine caches them: 40 bytes for n = 10."""
    return torch.full((n,), value)


def nbytes(flat: Tensor) -> int:
    return flat.numel() * flat.element_size()


def test_lru_evicts_the_least_recently_used_by_bytes() -> None:
    cache = ParamsCache(capacity_bytes=2 * nbytes(params(0.0)))
    ticket = cache.ticket()
    assert cache.put(("t", "a", "1"), params(1.0), ticket)
    assert cache.put(("t", "b", "1"), params(2.0), ticket)
    assert cache.get(("t", "a", "1")) is not None  # a is now the most recent
    assert cache.put(("t", "c", "1"), params(3.0), ticket)  # evicts b
    assert cache.get(("t", "b", "1")) is None
    assert cache.get(("t", "a", "1")) is not None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries) == (2, 1, 1, 2)
    assert stats.bytes == 2 * nbytes(params(0.0)) == stats.capacity_bytes


def test_big_entries_evict_several_and_oversize_ones_are_not_cached() -> None:
    cache = ParamsCache(capacity_bytes=100)
    ticket = cache.ticket()
    cache.put(("t", "a", "1"), params(1.0), ticket)  # 40 bytes
    cache.put(("t", "b", "1"), params(1.0), ticket)  # 80
    assert cache.put(("t", "c", "1"), params(1.0, n=20), ticket)  # 80 bytes: evicts a and b
    assert cache.stats().evictions == 2 and cache.stats().bytes == 80
    assert not cache.put(("t", "d", "1"), params(1.0, n=30), ticket)  # 120 > 100
    assert cache.stats().entries == 1
    assert not ParamsCache(0).put(("t", "a", "1"), params(1.0), 0)  # a budget of 0: no cache


def test_replacing_a_key_does_not_count_its_bytes_twice() -> None:
    cache = ParamsCache(capacity_bytes=1000)
    cache.put(("t", "a", "1"), params(1.0), 0)
    cache.put(("t", "a", "1"), params(2.0), 0)
    assert cache.stats().bytes == 40
    got = cache.get(("t", "a", "1"))
    assert got is not None and float(got.flat[0]) == 2.0


def test_forget_drops_every_version_of_one_client_of_one_tenant() -> None:
    cache = ParamsCache(capacity_bytes=1000)
    for key in [("t", "a", "1"), ("t", "a", "2"), ("t", "b", "1"), ("u", "a", "1")]:
        cache.put(key, params(1.0), cache.ticket())
    assert cache.forget("t", "a") == 2
    assert cache.get(("t", "a", "1")) is None and cache.get(("t", "a", "2")) is None
    assert cache.get(("t", "b", "1")) is not None and cache.get(("u", "a", "1")) is not None
    assert cache.stats().bytes == 80


def test_a_load_started_before_a_forget_is_not_cached() -> None:
    cache = ParamsCache(capacity_bytes=1000)
    ticket = cache.ticket()  # a miss starts loading ...
    cache.forget("t", "a")  # ... the client is deleted meanwhile ...
    assert not cache.put(("t", "a", "1"), params(1.0), ticket)  # ... so the load is not kept
    assert cache.put(("t", "b", "1"), params(1.0), ticket)  # other clients are unaffected
    assert cache.put(("t", "a", "1"), params(1.0), cache.ticket())  # a new load is fine


def test_a_recreated_clients_version_is_a_new_key_even_where_no_forget_was_heard() -> None:
    """Another process deleted and re-created the client: this cache heard nothing, but the
    new version 1 has a new uid, so the old entry can never answer it."""
    cache = ParamsCache(1000)
    assert cache.put(("t", "a", "0" * 32), params(1.0), cache.ticket())
    assert cache.get(("t", "a", "1" * 32)) is None
    assert cache.get(("t", "a", "0" * 32)) is not None
