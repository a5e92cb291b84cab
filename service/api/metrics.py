"""``GET /metrics``: Prometheus text from the official client, one registry per app.

What the service counts itself lives here: requests by route template, method and status,
their latency, commits (through the group commit's hook), and (through the engine's
observer hook) adaptation and inner-loop seconds. What the engine already counts (batch
sizes, queue, cache, refusals) is read from it at scrape time by a custom collector, never
counted twice. Stored clients and versions per meta-model come from one grouped query at
scrape time, reused for ``metrics_census_s`` seconds.

The registry is the app's own (``app.state.metrics.registry``), never the process-wide
default: tests start many apps in one process, and a second app must not find the first
one's metrics. Under ``serve --workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set), what every
front and the engine process counted is merged at scrape time instead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from service import usecases
from service.api.deps import AdminDep, SessionDep
from service.api.schemas import ErrorResponse
from service.engine import EngineObserver
from service.errors import Unavailable
from service.settings import Settings
from service.usecases import Runtime
from service.usecases.census import Stored

log = logging.getLogger(__name__)

# request latency: 1 ms (a cached prediction) to 30 s (the engine's default job timeout)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# an adaptation batch: 1 ms (a few steps of a small MLP) to a minute (big image batches)
ADAPT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)
KINDS = ("adapt", "predict", "encode")


class Metrics:
    """The app's registry and the metrics the service records itself."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "fastadapt_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fastadapt_http_request_duration_seconds",
            "Time from a request's arrival to its last response byte, by route template.",
            ["route", "method"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )
        adaptation = Histogram(
            "fastadapt_adaptation_seconds",
            "Per adaptation job: from its submit to the engine to its result (queue wait "
            "and its batch's run).",
            ["meta_model"],
            buckets=ADAPT_BUCKETS,
            registry=self.registry,
        )
        inner_loop = Histogram(
            "fastadapt_inner_loop_seconds",
            "Per adaptation batch: its run on the device (the inner loop, tensors in to "
            "adapted params out).",
            ["meta_model"],
            buckets=ADAPT_BUCKETS,
            registry=self.registry,
        )
        self.commits = Counter(
            "fastadapt_store_commits",
            "Transactions that stored new versions.",
            registry=self.registry,
        )
        self.committed = Counter(
            "fastadapt_store_versions_committed", "New versions stored.", registry=self.registry
        )
        self.observer = AdaptationObserver(adaptation, inner_loop)
        self.engine = EngineCollector()
        self.census = Census(settings.metrics_census_s)
        self.registry.register(self.engine)
        self.registry.register(self.census)
        self._requests: dict[tuple[str, str, int], Counter] = {}  # label children, cached
        self._latency: dict[tuple[str, str], Histogram] = {}

    def attach(self, runtime: Runtime) -> None:
        """Read the engine's, the commits' and the meta-models' counts from ``runtime``."""
        self.engine.runtime = runtime
        self.census.meta_models = tuple(runtime.registry.names())
        runtime.commits.on_commit = self._committed

    def _committed(self, rows: int) -> None:
        self.commits.inc()
        self.committed.inc(rows)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request (called on the event loop, by ``Observe``)."""
        counter = self._requests.get((route, method, status))
        if counter is None:
            counter = self.requests.labels(route, method, str(status))
            self._requests[(route, method, status)] = counter
        counter.inc()
        histogram = self._latency.get((route, method))
        if histogram is None:
            histogram = self.latency.labels(route, method)
            self._latency[(route, method)] = histogram
        histogram.observe(seconds)

    def render(self, accept: str | None, census: Callable[[], list[Stored]]) -> tuple[bytes, str]:
        """The exposition (Prometheus text unless ``accept`` asks for OpenMetrics) and its
        content type; ``census`` counts stored clients when the last count is too old."""
        self.census.refresh(census)
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self._merged() or self.registry), content_type

    def _merged(self) -> CollectorRegistry | None:
        """Under ``serve --workers N``: the counts of every front and of the engine
        process, merged from prometheus-client's multiprocess folder, with what is read
        at scrape time (the engine's stats, the census). None in a single process."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return None
        merged = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(merged)
        merged.register(self.engine)
        merged.register(self.census)
        return merged


class AdaptationObserver(EngineObserver):
    """The engine's hook: adaptation and inner-loop seconds, per meta-model."""

    def __init__(self, adaptation: Histogram, inner_loop: Histogram) -> None:
        self.adaptation = adaptation
        self.inner_loop = inner_loop

    def batch_ran(
        self, *, meta_model: str, kind: str, seconds: float, waited: Sequence[float]
    ) -> None:
        if kind != "adapt":
            return
        self.inner_loop.labels(meta_model).observe(seconds)
        per_job = self.adaptation.labels(meta_model)
        for wait in waited:
            per_job.observe(wait + seconds)


class EngineCollector(Collector):
    """Counts the engine keeps itself, read at scrape time."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        if runtime is None:  # before start-up
            return
        engine = runtime.engine
        try:
            stats = engine.stats()
        except Unavailable:  # the engine process is away: its families are left out
            return
        worker, cache = stats.worker, stats.cache
        yield GaugeMetricFamily(
            "fastadapt_engine_queue_depth", "Jobs waiting for the device now.", stats.queued
        )
        yield GaugeMetricFamily(
            "fastadapt_engine_queue_capacity",
            "Jobs that may wait before a request is refused (503).",
            engine.config.queue_size,
        )
        yield CounterMetricFamily(
            "fastadapt_engine_rejected", "Jobs refused because the queue was full.", stats.rejected
        )
        yield CounterMetricFamily(
            "fastadapt_engine_expired", "Jobs that waited past their deadline.", stats.expired
        )
        yield CounterMetricFamily(
            "fastadapt_engine_failed_jobs", "Jobs whose run raised.", worker.failed_jobs
        )
        sizes = HistogramMetricFamily(
            "fastadapt_engine_batch_size",
            "Jobs per batch run on the device, by kind (adapt, predict, encode: the texts of "
            "that many adaptations and predictions in one encoder pass).",
            labels=["kind"],
        )
        bounds = _powers_of_two(engine.config.max_batch_size)
        for kind in KINDS:
            buckets, total = _buckets(worker.batch_sizes.get(kind, {}), bounds)
            sizes.add_metric([kind], buckets, total)
        yield sizes
        yield CounterMetricFamily(
            "fastadapt_cache_hits", "Predictions whose params were cached.", cache.hits
        )
        yield CounterMetricFamily(
            "fastadapt_cache_misses",
            "Predictions whose params were read from the database.",
            cache.misses,
        )
        yield CounterMetricFamily(
            "fastadapt_cache_evictions", "Client versions evicted to fit.", cache.evictions
        )
        yield GaugeMetricFamily(
            "fastadapt_cache_bytes", "Bytes of adapted params cached now.", cache.bytes
        )
        yield GaugeMetricFamily(
            "fastadapt_cache_capacity_bytes", "The cache's budget.", cache.capacity_bytes
        )
        yield GaugeMetricFamily(
            "fastadapt_cache_entries", "Client versions cached now.", cache.entries
        )
        texts = stats.texts
        yield CounterMetricFamily(
            "fastadapt_encoder_passes",
            "Encoder passes run on the device (text meta-models).",
            texts.passes,
        )
        yield CounterMetricFamily(
            "fastadapt_encoder_texts",
            "Texts encoded by those passes (each distinct text not cached, once).",
            texts.encoded,
        )
        yield CounterMetricFamily(
            "fastadapt_embedding_cache_hits", "Texts whose embedding was cached.", texts.hits
        )
        yield CounterMetricFamily(
            "fastadapt_embedding_cache_misses",
            "Texts looked up and not cached (encoded, unless a pass found them later).",
            texts.misses,
        )
        yield GaugeMetricFamily(
            "fastadapt_embedding_cache_bytes", "Bytes of text embeddings cached now.", texts.bytes
        )
        yield GaugeMetricFamily(
            "fastadapt_embedding_cache_entries", "Text embeddings cached now.", texts.entries
        )


class Census(Collector):
    """Stored clients and versions per meta-model, counted at most every ``max_age_s``.

    A count that fails (the database is down) is not retried before ``max_age_s`` either,
    and its families are left out of the scrapes until a count succeeds.
    """

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self.meta_models: tuple[str, ...] = ()  # loaded ones: reported even when none stored
        self._stored: list[Stored] | None = None
        self._at = -float("inf")
        self._lock = threading.Lock()

    def refresh(self, count: Callable[[], list[Stored]]) -> None:
        with self._lock:  # concurrent scrapes count once
            now = time.monotonic()
            if now - self._at < self.max_age_s:
                return
            self._at = now
            try:
                self._stored = count()
            except Unavailable as exc:
                self._stored = None
                log.warning("metrics: stored clients not counted: %s", exc.message)

    def collect(self) -> Iterator[Metric]:
        stored = self._stored
        if stored is None:
            return
        clients = GaugeMetricFamily(
            "fastadapt_stored_clients",
            "Clients (all tenants) whose current version was adapted from the meta-model.",
            labels=["meta_model"],
        )
        versions = GaugeMetricFamily(
            "fastadapt_stored_versions",
            "Versions (all clients, all tenants) adapted from the meta-model.",
            labels=["meta_model"],
        )
        counted = {s.meta_model: s for s in stored}
        for name in sorted(set(self.meta_models) | set(counted)):
            entry = counted.get(name, Stored(name, 0, 0))
            clients.add_metric([name], entry.clients)
            versions.add_metric([name], entry.versions)
        yield clients
        yield versions


def _powers_of_two(largest: int) -> list[int]:
    bounds = [1]
    while bounds[-1] < largest:
        bounds.append(min(bounds[-1] * 2, largest))
    return bounds


def _buckets(sizes: dict[int, int], bounds: list[int]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative buckets of a size -> count table, and the sum of the sizes."""
    buckets = [(str(b), float(sum(n for s, n in sizes.items() if s <= b))) for b in bounds]
    buckets.append(("+Inf", float(sum(sizes.values()))))
    return buckets, float(sum(s * n for s, n in sizes.items()))


router = APIRouter(tags=["observability"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {}, "application/openmetrics-text": {}},
            "description": "Prometheus text format (OpenMetrics when the Accept header asks).",
        },
        403: {"model": ErrorResponse, "description": "The key lacks the admin scope."},
        503: {"model": ErrorResponse, "description": "The database is unavailable."},
    },
)
def metrics(request: Request, session: SessionDep, _admin: AdminDep) -> Response:
    """The service's metrics in Prometheus text format (OpenMetrics when asked). Needs an
    admin key where keys are needed: the counts cover every tenant."""
    app_metrics = cast(Metrics, request.app.state.metrics)
    body, content_type = app_metrics.render(
        request.headers.get("accept"), lambda: usecases.census.count(session=session)
    )
    return Response(body, media_type=content_type)
