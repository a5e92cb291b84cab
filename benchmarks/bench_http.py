"""HTTP end to end: a real ``fastadapt serve`` under wrk, batching on against off.

    python -m benchmarks.bench_http [--concurrency 1 16 64] [--seconds 5] [--repeats 3]
    python -m benchmarks.bench_http --overhead [--concurrency 64] ...

Starts two servers in this run, one with the engine's defaults and one with
``FASTADAPT_MAX_BATCH_SIZE=1``, each on a fresh SQLite database (or ``--database-url``),
and adapts ``--clients`` clients on each. Then wrk (closed loop, one thread, so the
server keeps most of the machine) drives adaptations (10 points of a random sinusoid,
10 inner steps) and predictions (10 points) for random clients at each concurrency.
The two servers take turns run by run, so a change in the machine's background load
hits both alike. Prints requests/s, p50/p99 latency and the mean batch the engine ran,
medians over repeats. Needs wrk (``apt-get install wrk``).

Both fastadapt servers run with auth on (``FASTADAPT_AUTH=required``, a key of tenant
``bench`` on every request). A third server takes its turns beside them: the HTTP
ceiling (``benchmarks/ceiling.py``: the same routes, request and response schemas under
the same uvicorn settings, answering constants), and a second table prints fastadapt's
share of it (batched req/s over ceiling req/s) against the goals: predictions at least
0.8 of it at 64 connections, adaptations at least 0.6. ``--modes`` runs a subset.

``--overhead`` measures the performance budget instead (auth, rate limiting, metrics and
access logs together cost at most 10% of prediction throughput at 64 connections): one
server with them all on (``FASTADAPT_AUTH=required`` and a key of tenant ``bench`` on
every request, a rate limit too high to refuse anything, /metrics, the access log to
its log file) against one with them all off, predictions only, same turns; it prints
the on/off throughput ratio against the 0.90 budget.
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import ExitStack

from benchmarks.serving import (
    Run,
    Server,
    ceiling,
    load,
    machine,
    post_all,
    require_wrk,
    server,
    threads,
    wrk,
)

AUTH = {"FASTADAPT_AUTH": "required"}  # and a key of tenant "bench" on every request
MODES = {
    "batched": AUTH,
    "unbatched": {**AUTH, "FASTADAPT_MAX_BATCH_SIZE": "1"},
    "ceiling": {},  # benchmarks/ceiling.py: HTTP, JSON and pydantic alone
}
SCRIPTS = {"adapt": "adapt.lua", "predict": "predict.lua"}
# --overhead: everything a public port needs, on against off (the budget: >= 0.90)
HUGE = str(10**9)  # requests per second (and burst) that no run reaches
OVERHEAD = {
    "on": {
        "FASTADAPT_AUTH": "required",
        "FASTADAPT_RATE_LIMIT_RPS": HUGE,
        "FASTADAPT_RATE_LIMIT_BURST": HUGE,
        "FASTADAPT_METRICS": "true",
        "FASTADAPT_ACCESS_LOG": "true",
    },
    # auto: no keys on loopback; no rate limit unless set
    "off": {
        "FASTADAPT_AUTH": "auto",
        "FASTADAPT_METRICS": "false",
        "FASTADAPT_ACCESS_LOG": "false",
    },
}
# the modes whose server gets a key, and of which tenant
TENANTS = {"on": "bench", "batched": "bench", "unbatched": "bench"}
BUDGET = 0.90
GOALS = {"predict": 0.8, "adapt": 0.6}  # share of the ceiling at the largest concurrency


def seed_clients(srv: Server, clients: int) -> None:
    body = {
        "meta_model": "sinusoid",
        "support": {
            "inputs": [[x / 2] for x in range(-5, 5)],
            "targets": [0.1 * x for x in range(-5, 5)],
        },
    }
    post_all(srv, [(f"/v1/clients/bench-{n}/adaptations", body) for n in range(clients)])


def measure(
    srv: Server, workload: str, connections: int, seconds: float, clients: int
) -> tuple[Run, float]:
    """One wrk run (after a second unmeasured, so the server's threads and connections
    are up), and the mean batch the engine ran meanwhile."""
    script = SCRIPTS[workload]
    wrk(srv.url, script, connections, 1, srv.key, CLIENTS=str(clients))
    if not srv.engine:  # the ceiling: no engine, no batches
        return wrk(srv.url, script, connections, seconds, srv.key, CLIENTS=str(clients)), 0.0
    before = srv.stats()[workload]
    run = wrk(srv.url, script, connections, seconds, srv.key, CLIENTS=str(clients))
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
    p.add_argument("--concurrency", type=int, nargs="+", help="default: 1 16 64 (--overhead: 64)")
    p.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--database-url", default=None, help="default: SQLite in a temp dir each")
    p.add_argument(
        "--overhead",
        action="store_true",
        help="auth, rate limit, metrics and access log on against off (predictions)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        help="default: all three (not with --overhead); the ceiling table needs batched and "
        "ceiling, the batching table batched and unbatched",
    )
    args = p.parse_args()
    concurrency = args.concurrency or ([64] if args.overhead else [1, 16, 64])
    modes = OVERHEAD if args.overhead else {m: MODES[m] for m in args.modes or MODES}
    workloads = ["predict"] if args.overhead else list(SCRIPTS)
    require_wrk()
    print(f"fastadapt bench_http: {machine()}")

    runs: dict[tuple[str, str, int], list[Run]] = {}
    batch: dict[tuple[str, str, int], list[float]] = {}
    with ExitStack() as stack:
        servers = {
            mode: stack.enter_context(
                ceiling()
                if mode == "ceiling"
                else server(env, args.database_url, tenant=TENANTS.get(mode))
            )
            for mode, env in modes.items()
        }
        for srv in servers.values():
            if srv.engine:
                seed_clients(srv, args.clients)
        settings = {mode: threads(srv.stats()) for mode, srv in servers.items() if srv.engine}
        for workload in workloads:
            for c in concurrency:
                for _ in range(args.repeats):
                    for mode, srv in servers.items():  # turns, so drift hits both alike
                        run, mean_batch = measure(srv, workload, c, args.seconds, args.clients)
                        runs.setdefault((mode, workload, c), []).append(run)
                        batch.setdefault((mode, workload, c), []).append(mean_batch)

    for mode, line in settings.items():
        print(f"{mode}: {line}")
    if args.overhead:
        report_overhead(runs, concurrency, args)
        return
    print(
        f"wrk -t1, {args.seconds:g} s runs, median of {args.repeats} (servers take turns); "
        f"{args.clients} clients, params cached; auth on (a key on every request); "
        f"database: {args.database_url or 'SQLite'}; load average after: {load()}\n"
    )
    errors = 0
    if "unbatched" in modes and "batched" in modes:
        errors += report_batching(runs, batch, workloads, concurrency)
    if "ceiling" in modes and "batched" in modes:
        errors += report_ceiling(runs, workloads, concurrency)
    if errors:
        print(f"\nnon-2xx responses or socket errors: {errors}")


def report_batching(
    runs: dict[tuple[str, str, int], list[Run]],
    batch: dict[tuple[str, str, int], list[float]],
    workloads: list[str],
    concurrency: list[int],
) -> int:
    """Batching on against off; the errors counted."""
    print(
        "| workload | conns | batched req/s | p50 ms | p99 ms | mean batch "
        "| unbatched req/s | p50 ms | p99 ms | throughput |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    errors = 0
    for workload in workloads:
        for c in concurrency:
            b, u = median(runs[("batched", workload, c)]), median(runs[("unbatched", workload, c)])
            mean_batch = statistics.median(batch[("batched", workload, c)])
            errors += b.errors + u.errors
            print(
                f"| {workload} | {c} | {b.rps:,.0f} | {b.p50_ms:.1f} | {b.p99_ms:.1f} "
                f"| {mean_batch:.1f} | {u.rps:,.0f} | {u.p50_ms:.1f} | {u.p99_ms:.1f} "
                f"| {b.rps / u.rps:.2f}x |"
            )
    return errors


def report_ceiling(
    runs: dict[tuple[str, str, int], list[Run]], workloads: list[str], concurrency: list[int]
) -> int:
    """fastadapt (batched) as a share of the HTTP ceiling; the errors counted."""
    print(
        "\nfastadapt's share of the HTTP ceiling (benchmarks/ceiling.py: same routes and "
        "schemas, same uvicorn, constant answers); goal at the largest concurrency: "
        + ", ".join(f"{w} >= {g}" for w, g in GOALS.items())
        + "\n"
    )
    print("| workload | conns | ceiling req/s | p50 ms | fastadapt req/s | p50 ms | share | goal |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    errors = 0
    top = max(concurrency)
    for workload in workloads:
        for c in concurrency:
            ceil = median(runs[("ceiling", workload, c)])
            fast = median(runs[("batched", workload, c)])
            errors += ceil.errors + fast.errors
            share = fast.rps / ceil.rps
            goal = GOALS[workload]
            verdict = ("met" if share >= goal else "MISSED") + f" (>= {goal})" if c == top else ""
            print(
                f"| {workload} | {c} | {ceil.rps:,.0f} | {ceil.p50_ms:.1f} | {fast.rps:,.0f} "
                f"| {fast.p50_ms:.1f} | {share:.2f} | {verdict} |"
            )
    return errors


def report_overhead(
    runs: dict[tuple[str, str, int], list[Run]], concurrency: list[int], args: argparse.Namespace
) -> None:
    """The budget's table: predictions with everything on against everything off."""
    on = ", ".join(f"{k}={v}" for k, v in OVERHEAD["on"].items())
    print(
        f"wrk -t1, {args.seconds:g} s runs, median of {args.repeats} (servers take turns); "
        f"predictions for {args.clients} clients, params cached; database: "
        f"{args.database_url or 'SQLite'}; on: {on}, a key on every request; "
        f"load average after: {load()}\n"
    )
    print("| conns | off req/s | p50 ms | p99 ms | on req/s | p50 ms | p99 ms | on/off | budget |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    errors = 0
    for c in concurrency:
        off, on_ = median(runs[("off", "predict", c)]), median(runs[("on", "predict", c)])
        errors += off.errors + on_.errors
        ratio = on_.rps / off.rps
        verdict = "met" if ratio >= BUDGET else "MISSED"
        print(
            f"| {c} | {off.rps:,.0f} | {off.p50_ms:.1f} | {off.p99_ms:.1f} "
            f"| {on_.rps:,.0f} | {on_.p50_ms:.1f} | {on_.p99_ms:.1f} | {ratio:.2f} "
            f"| {verdict} (>= {BUDGET:.2f}) |"
        )
    if errors:
        print(f"\nnon-2xx responses or socket errors: {errors} (a 401 or 429 voids the run)")


if __name__ == "__main__":
    main()
