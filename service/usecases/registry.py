"""The meta-model registry as a process sees it: which version of each name is promoted,
and the versions loaded in memory, any registered one on demand.

Artifacts live in the database (``meta_model_versions``, content-addressed by the sha256
of their weights), the one thing every replica already shares. A version is loaded from
its row when first asked for: the sha256 of the bytes is checked against the key, the
weights are read as safetensors (never pickle) and the config as JSON. Loaded versions
stay in a least-recently-used set bounded by ``meta_model_cache_bytes`` (weights bytes);
one unloaded here is unloaded from the engine too (once no job of it is queued or
running). The promoted version of each name is read from the database at most every
``promotion_refresh_s`` seconds, so a promotion made on one replica reaches every other
within that bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from models.checkpoint import MetaModel
from models.encoder import EncoderSpec, verify
from service.engine import Backend
from service.errors import Conflict, FastAdaptError, InvalidInput, NotFound
from service.settings import Settings
from service.store import registry as store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Promotion:
    name: str
    sha: str  # the promoted version
    promoted_at: datetime


def pinned_encoder(model: MetaModel) -> None:
    """A meta-model that pins a sentence encoder (``config.task.encoder``: text ones) runs
    only with that encoder installed: else ``InvalidInput`` naming the field and what
    differs (version, weights' sha256) or is missing. Loads nothing (the weights' sha256
    is computed once per process)."""
    pinned = model.config.task.get("encoder")
    if pinned is None:
        return
    try:
        verify(EncoderSpec.from_dict(pinned))
    except (ValueError, TypeError) as exc:  # EncoderMismatch is a ValueError
        raise InvalidInput("config.task.encoder", str(exc)) from None


class ModelRegistry:
    """Promoted versions by name (refreshed from the database), loaded versions by sha.

    ``promoted(session, name)`` and ``version(session, sha)`` are what use cases call;
    both read the database through the caller's session, only when they must."""

    def __init__(
        self,
        settings: Settings,
        engine: Backend | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity_bytes = settings.meta_model_cache_bytes
        self.refresh_s = settings.promotion_refresh_s
        self.engine = engine  # told which versions are unloaded (set once it exists)
        self.clock = clock
        # run with a session before the first read (the shipped artifacts' registration)
        self.pending: Callable[..., object] | None = None
        self._loaded: OrderedDict[str, tuple[MetaModel, int]] = OrderedDict()  # LRU first
        self._bytes = 0
        self._promoted: dict[str, Promotion] = {}
        self._read_at: float | None = None  # clock() of the last read of the promotions
        self._lock = threading.Lock()  # _loaded, _bytes
        self._loading = threading.Lock()  # one load from the database at a time
        self.loads = 0  # versions read from the database (tests, metrics)
        self.evictions = 0

    # -- promoted versions ---------------------------------------------------------------------
    def promotions(self, session: Session) -> dict[str, Promotion]:
        """Every name's promoted version, as read at most ``refresh_s`` ago."""
        pending = self.pending
        if pending is not None:  # the start-up registration, until it succeeds once
            pending(session=session)
            self.pending = None
        now = self.clock()
        if self._read_at is None or now - self._read_at >= self.refresh_s:
            rows = store.promoted(session=session)
            self._promoted = {
                r.name: Promotion(r.name, r.promoted_sha, r.promoted_at) for r in rows
            }
            self._read_at = now
        return self._promoted

    def names(self) -> list[str]:
        """The names known at the last read (no database read)."""
        return sorted(self._promoted)

    def invalidate(self) -> None:
        """Read the promotions again on next use (this process promoted something)."""
        self._read_at = None

    def promoted(self, session: Session, name: str) -> MetaModel:
        """The promoted version of ``name``, loaded; ``NotFound`` for an unknown name."""
        promotion = self.promotions(session).get(name)
        if promotion is None:
            raise NotFound(f"unknown meta-model {name!r}")
        return self.version(session, promotion.sha)

    # -- loaded versions -----------------------------------------------------------------------
    def version(self, session: Session, sha: str) -> MetaModel:
        """The registered version ``sha``, loaded (from the database if it is not);
        ``NotFound`` if no such version is registered."""
        model = self._hit(sha)
        if model is not None:
            return model
        with self._loading:
            model = self._hit(sha)  # loaded by another thread meanwhile
            if model is not None:
                return model
            row = store.get_version(session=session, sha=sha, weights=True)
            if row is None:
                raise NotFound(f"meta-model version {sha[:12]} is not registered")
            try:
                model = MetaModel.from_bytes(
                    row.config, row.weights, expected_sha=sha, source=f"meta-model {sha[:12]}"
                )
            except ValueError as exc:  # a row changed since, or NaN weights registered before
                log.error("meta-model version %s does not load: %s", sha[:12], exc)
                raise FastAdaptError(f"meta-model version {sha[:12]} is corrupt: {exc}") from None
            try:
                pinned_encoder(model)
            except InvalidInput as exc:  # registered by a server with another encoder
                log.error("meta-model version %s does not load: %s", sha[:12], exc.message)
                raise Conflict(
                    f"meta-model version {sha[:12]} ({model.name}) cannot run on this "
                    f"server: {exc.message}"
                ) from None
            self.loads += 1
            self._add(model, row.size_bytes)
        log.info("loaded meta-model %s@%s from the database", model.name, sha[:12])
        return model

    def add(self, model: MetaModel) -> None:
        """A version loaded elsewhere (registered from files now): keep it loaded."""
        if self._hit(model.version) is None:
            self._add(model, len(model.weights_bytes()))

    def loaded(self) -> list[str]:
        """Loaded versions' shas, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def cached(self, sha: str) -> MetaModel | None:
        """A loaded version, without reading the database (nor counting as a use)."""
        with self._lock:
            entry = self._loaded.get(sha)
            return None if entry is None else entry[0]

    def in_memory(self, sha: str) -> MetaModel | None:
        """The version ``sha`` if it is loaded (a use, for the LRU), else None: never reads
        the database."""
        return self._hit(sha)

    def _hit(self, sha: str) -> MetaModel | None:
        with self._lock:
            entry = self._loaded.get(sha)
            if entry is None:
                return None
            self._loaded.move_to_end(sha)
            return entry[0]

    def _add(self, model: MetaModel, size: int) -> None:
        """Keep ``model`` loaded; unload the least recently used others past the budget
        (never ``model`` itself, even when it alone is over it)."""
        evicted: list[str] = []
        with self._lock:
            self._loaded[model.version] = (model, size)
            self._bytes += size
            while self._bytes > self.capacity_bytes and len(self._loaded) > 1:
                sha, (_, freed) = self._loaded.popitem(last=False)
                self._bytes -= freed
                self.evictions += 1
                evicted.append(sha)
        for sha in evicted:
            log.info("unloaded meta-model version %s (least recently used)", sha[:12])
            if self.engine is not None:
                self.engine.release(sha)
