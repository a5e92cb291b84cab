"""``GET /v1/engine/stats``: the engine's counters since start-up, for dashboards and
benchmarks (wire schema and route together: a read-only view with no use case behind it).
The counters span every tenant, so they need the admin scope."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.api.deps import AdminDep, RuntimeDep
from service.api.schemas import ErrorResponse
from service.engine import Backend
from service.store.group_commit import GroupCommit

router = APIRouter(tags=["engine"], responses={403: {"model": ErrorResponse}})


class BatchStats(BaseModel):
    batches: int = Field(description="Batches run on the device.")
    jobs: int = Field(description="Jobs in those batches.")
    mean_batch: float = Field(description="jobs / batches (0 before the first batch).")


class CacheStatsResponse(BaseModel):
    hits: int
    misses: int = Field(description="Predictions whose params were read from the database.")
    evictions: int
    hit_rate: float = Field(description="hits / (hits + misses); 0 before any lookup.")
    entries: int = Field(description="Client versions cached now.")
    bytes: int = Field(description="Their params, in bytes.")
    capacity_bytes: int


class CommitStats(BaseModel):
    transactions: int = Field(description="Commits of new versions (groups and retries).")
    rows: int = Field(description="Versions they stored.")


class EngineStatsResponse(BaseModel):
    device: str
    threads: int = Field(description="Torch intra-op threads of the device worker.")
    max_batch_size: int
    max_batch_delay_ms: float
    queue_size: int = Field(description="Jobs that may wait before a request gets 503.")
    queued: int = Field(description="Jobs waiting now.")
    rejected: int = Field(description="Requests refused with 503 because the queue was full.")
    expired: int = Field(description="Jobs that waited past their deadline (503).")
    failed_jobs: int
    worker_restarts: int = Field(description="Times the device worker died and was restarted.")
    largest_batch: int
    adapt: BatchStats
    predict: BatchStats
    cache: CacheStatsResponse
    commits: CommitStats

    @classmethod
    def of(cls, engine: Backend, commits: GroupCommit) -> EngineStatsResponse:
        stats = engine.stats()
        worker, cache, config = stats.worker, stats.cache, engine.config
        lookups = cache.hits + cache.misses
        return cls(
            device=str(engine.device),
            threads=config.threads,
            max_batch_size=config.max_batch_size,
            max_batch_delay_ms=config.max_batch_delay_ms,
            queue_size=config.queue_size,
            queued=stats.queued,
            rejected=stats.rejected,
            expired=stats.expired,
            failed_jobs=worker.failed_jobs,
            worker_restarts=worker.restarts,
            largest_batch=worker.largest_batch,
            adapt=_batches(worker.adapt_batches, worker.adapt_jobs),
            predict=_batches(worker.predict_batches, worker.predict_jobs),
            cache=CacheStatsResponse(
                hits=cache.hits,
                misses=cache.misses,
                evictions=cache.evictions,
                hit_rate=cache.hits / lookups if lookups else 0.0,
                entries=cache.entries,
                bytes=cache.bytes,
                capacity_bytes=cache.capacity_bytes,
            ),
            commits=CommitStats(transactions=commits.commits, rows=commits.rows),
        )


def _batches(batches: int, jobs: int) -> BatchStats:
    return BatchStats(batches=batches, jobs=jobs, mean_batch=jobs / batches if batches else 0.0)


@router.get("/v1/engine/stats")
def engine_stats(runtime: RuntimeDep, _: AdminDep) -> EngineStatsResponse:
    """Counters since start-up: batches, queue, refusals, deadlines, the params cache.
    (A thread's: an engine process answers over its socket.)"""
    return EngineStatsResponse.of(runtime.engine, runtime.commits)
