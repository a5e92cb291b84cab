"""HTTP end to end: a real ``fastadapt serve`` under wrk, batching on against off.

    python -m benchmarks.bench_http [--concurrency 1 16 64] [--seconds 5] [--repeats 3]

Starts two servers in this run, one with the engine's defaults and one with
``FASTADAPT_MAX_BATCH_SIZE=1``, each on a fresh SQLite database (or ``--database-url``),
and adapts ``--clients`` clients on each. Then wrk (closed loop, one thread, so the
server keeps most of the machine) drives adaptations (10 points of a random sinusoid,
10 inner steps) and predictions (10 points) for random clients at each concurrency.
The two servers take turns run by run, so a change in the machine's background load
hits both alike. Prints requests/s, p50/p99 latency and the mean batch the engine ran,
medians over repeats. Needs wrk (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx

from benchmarks.serving import Run, Server, load, machine, require_wrk, server, threads, wrk

MODES = {"batched": {}, "unbatched": {"FASTADAPT_MAX_BATCH_SIZE": "1"}}
SCRIPTS = {"adapt": "adapt.lua", "predict": "predict.lua"}


def seed_clients(url: str, clients: int) -> None:
    body = {
        "meta_model": "sinusoid",
        "support": {
            "inputs": [[x / 2] for x in range(-5, 5)],
            "targets": [0.1 * x for x in range(-5, 5)],
        },
    }
    with httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(16) as pool:
        codes = list(
            pool.map(
                lambda n: http.post(f"/v1/clients/bench-{n}/adaptations", json=body).status_code,
                range(clients),
            )
        )
    bad = [c for c in codes if c != 201]
    if bad:
        raise RuntimeError(f"seeding clients failed: {bad[:5]}")


def measure(
    srv: Server, workload: str, connections: int, seconds: float, clients: int
) -> tuple[Run, float]:
    """One wrk run (after a second unmeasured, so the server's threads and connections
    are up), and the mean batch the engine ran meanwhile."""
    wrk(srv.url, SCRIPTS[workload], connections, 1, CLIENTS=str(clients))
    before = srv.stats()[workload]
    run = wrk(srv.url, SCRIPTS[workload], connections, seconds, CLIENTS=str(clients))
    after = srv.stats()[workload]
    batches = after["batches"] - before["batches"]
    return run, (after["jobs"] - before["jobs"]) / max(1, batches)


def median(runs: list[Run]) -> Run:
    return Run(
        statistics.median(r.rps for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
        sum(r.errors for r in runs),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--database-url", default=None, help="default: SQLite in a temp dir each")
    args = p.parse_args()
    require_wrk()
    print(f"fastadapt bench_http: {machine()}")

    runs: dict[tuple[str, str, int], list[Run]] = {}
    batch: dict[tuple[str, str, int], list[float]] = {}
    with ExitStack() as stack:
        servers = {
            mode: stack.enter_context(server(env, args.database_url)) for mode, env in MODES.items()
        }
        for srv in servers.values():
            seed_clients(srv.url, args.clients)
        settings = {mode: threads(srv.stats()) for mode, srv in servers.items()}
        for workload in SCRIPTS:
            for c in args.concurrency:
                for _ in range(args.repeats):
                    for mode, srv in servers.items():  # turns, so drift hits both alike
                        run, mean_batch = measure(srv, workload, c, args.seconds, args.clients)
                        runs.setdefault((mode, workload, c), []).append(run)
                        batch.setdefault((mode, workload, c), []).append(mean_batch)

    for mode, line in settings.items():
        print(f"{mode}: {line}")
    print(
        f"wrk -t1, {args.seconds:g} s runs, median of {args.repeats} (servers take turns); "
        f"{args.clients} clients, params cached; database: {args.database_url or 'SQLite'}; "
        f"load average after: {load()}\n"
    )
    print(
        "| workload | conns | batched req/s | p50 ms | p99 ms | mean batch "
        "| unbatched req/s | p50 ms | p99 ms | throughput |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    errors = 0
    for workload in SCRIPTS:
        for c in args.concurrency:
            b, u = median(runs[("batched", workload, c)]), median(runs[("unbatched", workload, c)])
            mean_batch = statistics.median(batch[("batched", workload, c)])
            errors += b.errors + u.errors
            print(
                f"| {workload} | {c} | {b.rps:,.0f} | {b.p50_ms:.1f} | {b.p99_ms:.1f} "
                f"| {mean_batch:.1f} | {u.rps:,.0f} | {u.p50_ms:.1f} | {u.p99_ms:.1f} "
                f"| {b.rps / u.rps:.2f}x |"
            )
    if errors:
        print(f"\nnon-2xx responses or socket errors: {errors}")


if __name__ == "__main__":
    main()
