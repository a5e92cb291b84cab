"""Predictions for 10,000 stored clients when the params cache is smaller than the
working set: requests/s and hit rate, so the cost of a miss (reading the client's
safetensors from the database) is visible.

    python -m benchmarks.bench_cache [--clients 10000] [--seconds 5] [--repeats 3]

One SQLite database holds ``--clients`` adapted sinusoid clients (adapted in-process
and bulk-written, as the service stores them). Three servers read it, differing only
in ``FASTADAPT_CACHE_BYTES``: no cache (every request misses), 20% of the working set,
and one that holds every client (filled by a scan first). wrk drives predictions (10
points) for uniformly random clients, so the small cache is the worst case for an
LRU: its hit rate is about its share of the working set. The servers take turns run
by run. Prints requests/s, p50/p99, hit rate, medians over repeats.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from benchmarks.clients import adapted_rows, sinusoid, store
from benchmarks.serving import Run, Server, load, machine, require_wrk, server, threads, wrk
from models.params import from_bytes, nbytes


def measure(srv: Server, connections: int, seconds: float, clients: int) -> tuple[Run, float]:
    """One wrk run of random predictions, and the hit rate meanwhile."""
    before = srv.stats()["cache"]
    run = wrk(srv.url, "predict.lua", connections, seconds, CLIENTS=str(clients))
    after = srv.stats()["cache"]
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    return run, hits / max(1, hits + misses)


def fill(srv: Server, clients: int, limit_s: float = 120.0) -> None:
    """Predict for every client in turn until the cache holds them all."""
    deadline = time.monotonic() + limit_s
    while (entries := srv.stats()["cache"]["entries"]) < clients:
        if time.monotonic() > deadline:
            raise RuntimeError("the cache did not fill")
        wrk(srv.url, "scan.lua", 16, 3, CLIENTS=str(clients), START=str(entries))


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--share", type=float, default=0.2, help="small cache / working set")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    require_wrk()
    print(f"fastadapt bench_cache: {machine()}")

    meta = sinusoid()
    started = time.perf_counter()
    rows = adapted_rows(meta, args.clients)
    per_client = nbytes(from_bytes(rows[0].params))  # what the cache counts per entry
    working_set = per_client * args.clients
    configs = {
        "no cache": 0,
        f"{args.share:.0%} of the working set": int(working_set * args.share),
        "holds every client": 2 * working_set,
    }
    results: dict[str, list[tuple[Run, float]]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="fastadapt-bench-cache-") as data, ExitStack() as stack:
        url = f"sqlite:///{Path(data) / 'clients.db'}"
        store(url, rows)
        print(
            f"{args.clients} clients adapted and stored in {time.perf_counter() - started:.0f} s; "
            f"{per_client} bytes of params each, working set {working_set / 2**20:.1f} MiB"
        )
        servers = {
            name: stack.enter_context(server({"FASTADAPT_CACHE_BYTES": str(size)}, url))
            for name, size in configs.items()
        }
        fill(servers["holds every client"], args.clients)
        for srv in servers.values():  # warm: the small cache full, the connections open
            wrk(srv.url, "predict.lua", args.connections, 2, CLIENTS=str(args.clients))
        setting = threads(next(iter(servers.values())).stats())
        for _ in range(args.repeats):
            for name, srv in servers.items():  # turns, so drift hits all alike
                results[name].append(measure(srv, args.connections, args.seconds, args.clients))

    print(setting)
    print(
        f"wrk -t1 -c{args.connections}, {args.seconds:g} s runs, median of {args.repeats} "
        f"(servers take turns); uniformly random clients, 10 points per request; "
        f"database: SQLite; load average after: {load()}\n"
    )
    print("| cache | capacity MiB | req/s | p50 ms | p99 ms | hit rate | vs all cached |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    best = statistics.median(r.rps for r, _ in results["holds every client"])
    for name, size in configs.items():
        runs = [r for r, _ in results[name]]
        rps = statistics.median(r.rps for r in runs)
        print(
            f"| {name} | {size / 2**20:.1f} | {rps:,.0f} "
            f"| {statistics.median(r.p50_ms for r in runs):.1f} "
            f"| {statistics.median(r.p99_ms for r in runs):.1f} "
            f"| {statistics.median(h for _, h in results[name]):.0%} | {rps / best:.2f}x |"
        )
    worst = statistics.median(r.rps for r, _ in results["no cache"])
    print(
        f"\na miss costs the server {1000 / worst - 1000 / best:.2f} ms per request "
        "(1 / req/s, no cache against all cached): reading the version's safetensors from "
        "the database and moving them to the device"
    )
    errors = sum(r.errors for runs in results.values() for r, _ in runs)
    if errors:
        print(f"\nnon-2xx responses or socket errors: {errors}")


if __name__ == "__main__":
    main()
