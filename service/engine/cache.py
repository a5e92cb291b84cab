"""Adapted parameters on the device: an LRU cache with a byte budget.

An entry is one client version's fast params flattened into one tensor (the engine's
``BytesPacker`` lays them out), with views of it laid out for a one-client forward
(``FastParams``: made once, when cached, not per prediction), keyed by (tenant_id,
client_id, uid). A version is
immutable and its uid is never reused, so a key never goes stale and never comes back:
a new version, or a client deleted and re-created, is a new key in every process, which
is what keeps a server from serving a deleted model another server's delete never told
it about. ``forget(tenant, client)`` drops every cached version of a client, and a load
that started before the forget is not cached when it finishes: no longer needed for
correctness (such an entry's key could never be asked for again), this only frees a
deleted client's bytes at once instead of when the LRU gets to them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from torch import Tensor

from service.engine.jobs import Key

Client = tuple[str, str]  # (tenant_id, client_id)

_FORGET_LOG = 4096  # forgets remembered for loads in flight; older ones make a load uncached


class FastParams(NamedTuple):
    """One client version's adapted params as the engine holds them."""

    flat: Tensor  # (P,) every fast entry, flattened in the BytesPacker's order
    layers: tuple[Tensor, ...] = ()  # views of ``flat`` for a one-client forward, or ()
    arrays: tuple[np.ndarray, ...] = ()  # the same as NumPy views (a small net's, on the CPU)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    capacity_bytes: int


class ParamsCache:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Key, tuple[FastParams, int]] = OrderedDict()  # LRU first
        self._bytes = 0
        self._lock = threading.Lock()
        self._epoch = 0  # bumped by every forget
        self._forgotten: deque[tuple[int, Client]] = deque(maxlen=_FORGET_LOG)
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Key) -> FastParams | None:
        """The cached params of ``key`` (counted as a hit or a miss)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            self.misses += 1
            return None

    def ticket(self) -> int:
        """Take before computing or reading params to cache; ``put`` checks it for
        forgets since."""
        with self._lock:
            return self._epoch

    def put(self, key: Key, params: FastParams | Tensor, ticket: int) -> bool:
        """Cache ``params`` (a bare tensor: its flat form) unless its client was forgotten
        since ``ticket`` or it cannot fit."""
        if isinstance(params, Tensor):
            params = FastParams(params)
        size = params.flat.numel() * params.flat.element_size()
        with self._lock:
            if self._forgotten_since(ticket, key[:2]) or size > self.capacity_bytes:
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (params, size)
            self._bytes += size
            while self._bytes > self.capacity_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self._bytes -= freed
                self.evictions += 1
            return True

    def _forgotten_since(self, ticket: int, client: tuple[str, ...]) -> bool:
        if ticket == self._epoch:
            return False
        if ticket < self._epoch - len(self._forgotten):
            return True  # the log no longer reaches back to the ticket: assume the worst
        return any(epoch > ticket and who == client for epoch, who in self._forgotten)

    def forget(self, tenant_id: str, client_id: str) -> int:
        """Drop every cached version of a client; returns how many were dropped."""
        with self._lock:
            self._epoch += 1
            self._forgotten.append((self._epoch, (tenant_id, client_id)))
            doomed = [k for k in self._entries if k[0] == tenant_id and k[1] == client_id]
            for key in doomed:
                self._bytes -= self._entries.pop(key)[1]
            return len(doomed)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self.hits,
                self.misses,
                self.evictions,
                len(self._entries),
                self._bytes,
                self.capacity_bytes,
            )
