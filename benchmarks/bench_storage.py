"""Bytes stored per client version, and device memory per 10,000 cached clients.

    python -m benchmarks.bench_storage [--clients 10000] [--postgres-url URL]

Adapts ``--clients`` sinusoid clients in-process (10 points, 10 steps, as the HTTP
benchmarks do) and stores one version each, as the service does: in a fresh SQLite
database, and in a fresh schema of ``--postgres-url`` when given (default: the test
server of ``FASTADAPT_TEST_POSTGRES_URL``; skipped when unset or unreachable). Prints
what one version costs in each, measured from the databases (SQLite's dbstat, PostgreSQL's
relation sizes, indexes and TOAST included), then what the engine's params cache holds
for ``--clients`` clients: the bytes it counts, and the memory the process or the GPU
actually gave it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from sqlalchemy import make_url, text
from sqlalchemy.exc import SQLAlchemyError

from benchmarks.clients import adapted_rows, sinusoid, store
from benchmarks.serving import machine
from service.engine.core import Engine, EngineConfig
from service.store.session import connect
from service.store.tables import ClientVersion

TABLES = ("clients", "client_versions")


def sqlite_bytes(rows: list[ClientVersion], directory: Path) -> dict[str, int]:
    """Bytes on disk per table (its indexes included), from SQLite's dbstat."""
    url = f"sqlite:///{directory / 'storage.db'}"
    store(url, rows)
    database = connect(url)
    sizes: dict[str, int] = dict.fromkeys(TABLES, 0)
    with database.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        for _name, table, size in connection.exec_driver_sql(
            "SELECT name, tbl_name, SUM(pgsize) FROM dbstat JOIN sqlite_schema USING (name) "
            "GROUP BY name"
        ):
            if table in sizes:
                sizes[table] += int(size)
    database.dispose()
    return sizes


@contextmanager
def postgres_schema(server: str) -> Iterator[str]:
    """A fresh schema on ``server``, dropped afterwards; yields its URL."""
    schema = f"fastadapt_bench_{uuid.uuid4().hex[:12]}"
    admin = connect(server)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(server).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def postgres_bytes(rows: list[ClientVersion], server: str) -> dict[str, int]:
    """Bytes per table: heap, TOAST and indexes (``pg_total_relation_size``), vacuumed."""
    with postgres_schema(server) as url:
        store(url, rows)
        database = connect(url)
        with database.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                "VACUUM ANALYZE"
            )
            sizes = {
                table: int(
                    connection.execute(
                        text("SELECT pg_total_relation_size(CAST(:t AS regclass))"), {"t": table}
                    ).scalar_one()
                )
                for table in TABLES
            }
        database.dispose()
    return sizes


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cache_memory(rows: list[ClientVersion], device: str) -> tuple[int, int, str]:
    """(bytes the cache counts, memory it took, how that was measured) for every row's
    params cached on ``device``."""
    meta = sinusoid()
    engine = Engine({meta.name: meta}, EngineConfig(device=device, cache_bytes=2**40))
    engine.start()
    try:
        cuda = engine.device.type == "cuda"
        before = torch.cuda.memory_allocated(engine.device) if cuda else rss_bytes()
        runner = engine.runners[meta.version]
        for row in rows:  # as a prediction's miss or ``Engine.stored`` caches params
            key = (row.tenant_id, row.client_id, row.uid)
            fast = runner.fast_params(row.params).to(engine.device)
            engine.cache.put(key, fast, engine.cache.ticket())
        after = torch.cuda.memory_allocated(engine.device) if cuda else rss_bytes()
        how = "torch.cuda.memory_allocated" if cuda else "process RSS"
        return engine.cache.stats().bytes, after - before, how
    finally:
        engine.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--postgres-url", default=os.environ.get("FASTADAPT_TEST_POSTGRES_URL"))
    p.add_argument("--device", default="auto", help="the cache's device: auto, cpu, cuda")
    args = p.parse_args()
    n = args.clients
    print(f"fastadapt bench_storage: {machine()}")
    rows = adapted_rows(sinusoid(), n)
    params = sum(len(r.params) for r in rows) / n
    inputs = sum(len(r.support_inputs) for r in rows) / n
    targets = sum(len(r.support_targets) for r in rows) / n
    print(f"{n} clients, one version each: sinusoid 1-40-40-1 (1,761 float32), 10-point support\n")

    print("| stored per client version | bytes |")
    print("|---|---:|")
    print(f"| adapted params (safetensors: 7,044 B of float32 + header) | {params:,.0f} |")
    print(f"| support set (JSON text: inputs + targets) | {inputs + targets:,.0f} |")
    with tempfile.TemporaryDirectory(prefix="fastadapt-bench-storage-") as data:
        for name, size in sqlite_bytes(rows, Path(data)).items():
            print(f"| SQLite, table `{name}` with its indexes (dbstat) | {size / n:,.0f} |")
    if args.postgres_url:
        try:
            for name, size in postgres_bytes(rows, args.postgres_url).items():
                print(f"| PostgreSQL, `{name}` (heap + TOAST + indexes) | {size / n:,.0f} |")
        except SQLAlchemyError as exc:
            print(f"| PostgreSQL: skipped ({type(exc).__name__}) | |")
    else:
        print("| PostgreSQL: skipped (no --postgres-url) | |")

    counted, measured, how = cache_memory(rows, args.device)
    print(f"\n| params cache | {n:,} clients | per client |")
    print("|---|---:|---:|")
    print(f"| bytes it counts (its budget) | {counted / 2**20:,.1f} MiB | {counted / n:,.0f} B |")
    print(f"| memory it took ({how}) | {measured / 2**20:,.1f} MiB | {measured / n:,.0f} B |")


if __name__ == "__main__":
    main()
