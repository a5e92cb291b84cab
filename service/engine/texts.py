"""Texts -> embeddings on the device: the encode stage of text meta-models' jobs.

A text meta-model's adaptations and predictions arrive with their inputs as texts. Before
its inner loop or forward pass, each job's texts become the pinned encoder's embeddings:
texts already in the ``EmbeddingCache`` (an LRU by bytes, keyed by the encoder's weights,
the tenant and the text) are taken from it in the submitting thread; the rest go to the device
worker as an encode job, and the worker encodes every queued encode job's texts in one
pass (adaptations and predictions of any clients together, each distinct text once,
sorted by length inside the encoder so padding stays small). A re-adaptation, a rollback
or a reconcile of texts the server has seen encodes nothing.

The cache is kept per tenant (the job's ``scope``): were it shared, a tenant could time
its own requests to learn whether another tenant had sent a given text. One pass still
encodes a text that two tenants sent together once.

One encoder per pinned spec per engine (the device's), loaded when the first meta-model
that pins it is; half precision on CUDA when ``half`` is set.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, TypeGuard

import torch
from torch import Tensor

from models.encoder import EncoderSpec, SentenceEncoder, shared
from service.engine.jobs import Texts

ENTRY_OVERHEAD = 200  # bytes an entry costs beyond its vector and text (dict, key, node)


def is_texts(inputs: object) -> TypeGuard[Texts]:
    return isinstance(inputs, tuple) and bool(inputs) and isinstance(inputs[0], str)


@dataclass(frozen=True)
class EmbeddingStats:
    hits: int  # texts found in the cache (at submit or in the worker's pass)
    misses: int  # texts not found there
    entries: int
    bytes: int
    capacity_bytes: int
    passes: int = 0  # encode batches run on the device
    encoded: int = 0  # texts those passes encoded (each distinct uncached text once)


class EmbeddingCache:
    """(slot, text) -> its embedding (D,) on the CPU, least recently used out first once
    the entries' bytes pass ``capacity_bytes``; a slot is an encoder's sha (and, in the
    engine, a tenant: ``_slot``). Thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(text: str, vector: Tensor) -> int:
        return vector.numel() * vector.element_size() + len(text) + ENTRY_OVERHEAD

    def get(self, sha: str, texts: Sequence[str], count: bool = True) -> list[Tensor | None]:
        """Each text's embedding, or None; ``count``: as hits and misses (a job's texts
        count once, when it is submitted, not again in the encode pass)."""
        found: list[Tensor | None] = []
        with self._lock:
            for text in texts:
                vector = self._entries.get((sha, text))
                if vector is not None:
                    self._entries.move_to_end((sha, text))
                found.append(vector)
            if count:
                hits = sum(v is not None for v in found)
                self.hits += hits
                self.misses += len(found) - hits
        return found

    def put(self, sha: str, texts: Sequence[str], vectors: Tensor) -> None:
        with self._lock:
            for text, vector in zip(texts, vectors, strict=True):
                key = (sha, text)
                if key in self._entries:
                    continue
                size = self._size(text, vector)
                if size > self.capacity_bytes:
                    continue
                self._entries[key] = vector
                self._bytes += size
            while self._bytes > self.capacity_bytes and self._entries:
                (_, old), vector = self._entries.popitem(last=False)
                self._bytes -= self._size(old, vector)

    def stats(self) -> EmbeddingStats:
        with self._lock:
            return EmbeddingStats(
                self.hits, self.misses, len(self._entries), self._bytes, self.capacity_bytes
            )


class EncodeWork(NamedTuple):
    sha: str  # the encoder's weights (its key in ``TextStage.encoders``)
    texts: Texts  # the job's texts, in order
    scope: str = ""  # whose texts (the tenant): the cache keeps each tenant's apart


def _slot(sha: str, scope: str) -> str:
    """The cache's first key part: one encoder's embeddings of one tenant's texts."""
    return f"{sha}/{scope}"


class TextStage:
    """The engine's encoders (one per pinned spec) and their embedding cache."""

    def __init__(self, device: torch.device, cache_bytes: int, half: bool) -> None:
        self.device = device
        self.half = half and device.type == "cuda"
        self.cache = EmbeddingCache(cache_bytes)
        self.encoders: dict[str, SentenceEncoder] = {}  # by weights sha
        self._shas: dict[EncoderSpec, str] = {}
        self._lock = threading.Lock()
        self.passes = 0  # encode batches run (on the device worker's thread only)
        self.encoded = 0  # texts they encoded

    def prepare(self, spec: EncoderSpec) -> str:
        """Load the encoder ``spec`` pins, once (``EncoderMismatch`` if the installed one
        differs): its key, the weights' sha."""
        with self._lock:
            sha = self._shas.get(spec)
            if sha is None:
                encoder = shared(spec, str(self.device), self.half)
                sha = encoder.sha
                self.encoders[sha] = encoder
                self._shas[spec] = sha
            return sha

    def cached(self, sha: str, texts: Texts, scope: str = "") -> Tensor | None:
        """The texts' embeddings (N, D) if every one is cached for ``scope``, else None."""
        found = self.cache.get(_slot(sha, scope), texts)
        if any(v is None for v in found):
            return None
        return torch.stack(found)  # type: ignore[arg-type]  # none is None

    def encode(self, works: Sequence[EncodeWork]) -> list[Tensor]:
        """Each work's embeddings (N_i, D), encoding every distinct uncached text of the
        batch in one pass. On the device worker's thread."""
        self.passes += 1
        by_sha: dict[str, list[int]] = {}
        for i, work in enumerate(works):
            by_sha.setdefault(work.sha, []).append(i)
        results: dict[int, Tensor] = {}
        for sha, members in by_sha.items():
            # each work's texts with their cached embedding or None (its tenant's cache)
            known = {i: self._known(sha, works[i]) for i in members}
            missing = sorted({t for i in members for t, v in known[i] if v is None})
            fresh: dict[str, Tensor] = {}
            if missing:  # each text once, whoever sent it
                vectors = self.encoders[sha].encode(missing)  # (M, D) on the CPU
                self.encoded += len(missing)
                fresh = dict(zip(missing, vectors, strict=True))
            for i in members:
                new = sorted({t for t, v in known[i] if v is None})
                if new:
                    slot = _slot(sha, works[i].scope)
                    self.cache.put(slot, new, torch.stack([fresh[t] for t in new]))
                results[i] = torch.stack([fresh[t] if v is None else v for t, v in known[i]])
        return [results[i] for i in range(len(works))]

    def _known(self, sha: str, work: EncodeWork) -> list[tuple[str, Tensor | None]]:
        found = self.cache.get(_slot(sha, work.scope), work.texts, count=False)
        return list(zip(work.texts, found, strict=True))

    def stats(self) -> EmbeddingStats:
        return replace(self.cache.stats(), passes=self.passes, encoded=self.encoded)

    def warm_up(self) -> None:
        for encoder in list(self.encoders.values()):
            encoder.encode(["warm up", "a second, longer text to warm up with"])
