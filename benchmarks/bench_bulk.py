"""Bulk endpoints against one request per client: clients per second over HTTP.

    python -m benchmarks.bench_bulk [--concurrency 16] [--items 256] [--adapt-items 64]
                                    [--seconds 5] [--adapt-seconds 10] [--repeats 3]

One real ``fastadapt serve`` (keys required, a key on every request, as in production) on
a fresh SQLite database (or ``--database-url``), ``--clients`` clients adapted first.
wrk (closed loop, one thread) then drives, at the same connection count, predictions (10
points per client) and adaptations (10 points of a random sinusoid, 5 inner steps) two
ways, taking turns run by run so the machine's background load hits both alike: one
request per client (``POST /v1/clients/<id>/predictions``, ``.../adaptations``), and bulk
requests of ``--items`` (predictions) or ``--adapt-items`` (adaptations) distinct random
clients (``POST /v1/predictions:batch``,
``/v1/adaptations:batch``). Prints requests/s, clients/s, p50/p99 latency, medians over
repeats, and the ratio of clients/s, bulk over single (issue 14's goal: >= 10x). Divergent
adaptations are stored (``FASTADAPT_ALLOW_DIVERGENT``) so both ways do the same work.
Needs wrk (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import time

import httpx

from benchmarks.bench_http import HUGE, median, seed_clients
from benchmarks.serving import Run, Server, load, machine, require_wrk, server, threads, wrk

GOAL = 10.0
WORKLOADS = ("predict", "adapt")
PATHS = {"predict": "/v1/predictions:batch", "adapt": "/v1/adaptations:batch"}


def measure(
    srv: Server, workload: str, items: int, connections: int, seconds: float, clients: int
) -> Run:
    """One wrk run (after a second unmeasured, so the server's threads are up); ``items``
    0: one request per client."""
    env = {"CLIENTS": str(clients), "ITEMS": str(items), "WORKLOAD": workload}
    wrk(srv.url, "bulk.lua", connections, 1, srv.key, **env)
    settle(srv)
    run = wrk(srv.url, "bulk.lua", connections, seconds, srv.key, **env)
    settle(srv)
    return run


def settle(srv: Server) -> None:
    """Wait until the engine's queue is empty: wrk stops at its deadline, but the bulk
    requests it left in flight (thousands of jobs) still run, and would slow the next run."""
    idle = 0
    while idle < 3:
        idle = idle + 1 if srv.stats()["queued"] == 0 else 0
        time.sleep(0.2)


def sample_failures(srv: Server, workload: str, items: int) -> int:
    """Failed items in one bulk request like the benchmark's (they would not show as
    non-2xx): any means the numbers are void."""
    ids = [f"bench-{n}" for n in range(items)]
    if workload == "predict":
        body: dict[str, object] = {"requests": [{"client_id": c, "inputs": [[0.5]]} for c in ids]}
    else:
        support = {
            "inputs": [[x / 2] for x in range(-5, 5)],
            "targets": [0.1 * x for x in range(-5, 5)],
        }
        body = {
            "adaptations": [
                {"client_id": c, "meta_model": "sinusoid", "support": support} for c in ids
            ]
        }
    response = httpx.post(srv.url + PATHS[workload], json=body, headers=srv.headers, timeout=120)
    response.raise_for_status()
    return sum("error" in r for r in response.json()["results"])


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[16])
    p.add_argument("--items", type=int, default=256, help="clients per bulk prediction")
    p.add_argument("--adapt-items", type=int, default=64, help="clients per bulk adaptation")
    p.add_argument("--seconds", type=float, default=5.0, help="per wrk run (predictions)")
    # a run must be much longer than one bulk request takes, or it counts few of them: at
    # 16 connections 16 x 64 adaptations are in flight, a second or more on 2 busy cores
    p.add_argument("--adapt-seconds", type=float, default=10.0, help="per wrk run (adapt)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    args = p.parse_args()
    items = {"predict": args.items, "adapt": args.adapt_items}
    seconds = {"predict": args.seconds, "adapt": args.adapt_seconds}
    if not all(1 <= n <= args.clients for n in items.values()):
        raise SystemExit("--items and --adapt-items must be between 1 and --clients")
    require_wrk()
    print(f"fastadapt bench_bulk: {machine()}")
    # every job of every connection's bulk request fits the engine's queue
    queue = max(1024, max(items.values()) * max(args.concurrency) * 2)
    env = {
        "FASTADAPT_AUTH": "required",
        "FASTADAPT_RATE_LIMIT_RPS": HUGE,
        "FASTADAPT_RATE_LIMIT_BURST": HUGE,
        "FASTADAPT_ALLOW_DIVERGENT": "true",
        "FASTADAPT_MAX_BULK": str(max(items.values())),
        "FASTADAPT_QUEUE_SIZE": str(queue),
    }
    runs: dict[tuple[str, str, int], list[Run]] = {}
    failures = {}
    with server(env, args.database_url, tenant="bench") as srv:
        seed_clients(srv, args.clients)
        settings = threads(srv.stats())
        for workload in WORKLOADS:
            failures[workload] = sample_failures(srv, workload, items[workload])
            for c in args.concurrency:
                for _ in range(args.repeats):
                    for way, n in (("single", 0), ("bulk", items[workload])):  # turns
                        run = measure(srv, workload, n, c, seconds[workload], args.clients)
                        runs.setdefault((way, workload, c), []).append(run)

    print(settings)
    print(
        f"wrk -t1, {args.seconds:g} s runs ({args.adapt_seconds:g} s adaptations), median "
        f"of {args.repeats} (the two ways take turns on one server); keys required; "
        f"{args.clients} clients; bulk requests of {args.items} clients (adaptations: "
        f"{args.adapt_items}); database: {args.database_url or 'SQLite'}; "
        f"load average after: {load()}\n"
    )
    print(
        "| workload | conns | single req/s = clients/s | p50 ms | p99 ms | bulk req/s "
        "| clients/s | p50 ms | p99 ms | clients/s bulk/single |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    errors = 0
    for workload in WORKLOADS:
        for c in args.concurrency:
            s, b = median(runs[("single", workload, c)]), median(runs[("bulk", workload, c)])
            ratios = [
                bulk.rps * items[workload] / max(single.rps, 1e-9)
                for single, bulk in zip(
                    runs[("single", workload, c)], runs[("bulk", workload, c)], strict=True
                )
            ]
            errors += s.errors + b.errors
            ratio = b.rps * items[workload] / max(s.rps, 1e-9)
            verdict = "met" if ratio >= GOAL else "MISSED"
            print(
                f"| {workload} | {c} | {s.rps:,.0f} | {s.p50_ms:.1f} | {s.p99_ms:.1f} "
                f"| {b.rps:,.1f} | {b.rps * items[workload]:,.0f} | {b.p50_ms:.1f} "
                f"| {b.p99_ms:.1f} "
                f"| {ratio:.1f}x ({verdict}, >= {GOAL:g}x; per turn "
                f"{min(ratios):.1f}-{max(ratios):.1f}x) |"
            )
    print(f"\nfailed items in a sample bulk request: {failures}")
    if errors:
        print(f"non-2xx responses or socket errors: {errors}")


if __name__ == "__main__":
    main()
