"""Front processes: ``fastadapt serve --workers N`` against one process, over HTTP under wrk.

    python -m benchmarks.bench_workers [--workers 2] [--concurrency 64] [--seconds 5]
        [--text-seconds 20] [--repeats 3] [--workloads predict adapt text-predict text-adapt]
    python -m benchmarks.bench_workers --database-url postgresql+psycopg://user@host/postgres

Starts four servers in this run and lets them take turns run by run, so a change in the
machine's background load hits all alike:

- ``single``: ``fastadapt serve`` with ``FASTADAPT_WORKERS=1``, one process, the engine in it;
- ``workers``: the same with ``FASTADAPT_WORKERS=N`` (``--workers``, 2): N HTTP fronts on
  the one port and one engine process that batches across all of them;
- ``ceiling`` and ``ceiling-workers``: the HTTP ceiling (``benchmarks/ceiling.py``: the
  same routes and schemas under the same uvicorn settings, answering constants) in one
  process and in N uvicorn worker processes.

Both fastadapt servers run with auth on (``FASTADAPT_AUTH=required``, a key of tenant
``bench`` on every request), each on a fresh SQLite database, or with ``--database-url``
on a fresh PostgreSQL database of its own on that server (created, migrated, and dropped
at the end). Each is seeded with ``--clients`` sinusoid clients and ``--text-clients``
clients of the shipped ``intents`` meta-model. Then wrk (closed loop, one thread,
``--concurrency`` connections) drives each workload after a second unmeasured, the
fastadapt server idle (no job queued, its processes quiet) before and after each
measured run:

- ``predict`` / ``adapt``: sinusoid predictions of 10 points / adaptations of 10 points
  with 10 inner steps, random clients (``benchmarks/wrk/predict.lua``, ``adapt.lua``;
  the ceilings run these two too);
- ``text-predict``: a prediction of one new sentence for a random text client;
- ``text-adapt``: a 10-intent, 5-example adaptation of a new client, every text new
  (both from ``benchmarks.bench_text``'s request files, replayed by
  ``benchmarks/wrk/replay.lua``, the same file for both servers). Their runs are longer
  (``--text-seconds``, 20): at 64 connections the engine runs a batch of 64 new
  adaptations (3,200 new texts to encode) for many seconds on a CPU, and a run must be
  several times that for wrk to see its latency (a row whose runs got no answer says so).

Prints requests/s, p50/p99 latency and the mean batch the engine ran (medians over
``--repeats``), then two tables against the goals: the workers' throughput at least 1.7x
the single process's with their p99 at most 4x their p50; and each server's share of its
ceiling (single over ceiling, workers over ceiling-workers): predictions at least 0.5,
adaptations at least 0.3. Needs wrk (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_http import AUTH, median, seed_clients
from benchmarks.bench_text import Bodies, write_requests
from benchmarks.serving import (
    Run,
    Server,
    ceiling,
    fresh_database,
    load,
    machine,
    post_all,
    processes,
    require_wrk,
    server,
    threads,
    wait_idle,
    wrk,
)

SINUSOID = {"predict": "predict.lua", "adapt": "adapt.lua"}  # workload: its wrk script
TEXT = {"text-predict": "predict", "text-adapt": "adapt-new"}  # workload: bench_text's
WORKLOADS = (*SINUSOID, *TEXT)
KIND = {"predict": "predict", "adapt": "adapt", "text-predict": "predict", "text-adapt": "adapt"}
GUESS_RPS = {"text-predict": 300.0, "text-adapt": 10.0}  # to size the first request files
FASTADAPT = ("single", "workers")  # the modes that are fastadapt servers
CEILINGS = {"single": "ceiling", "workers": "ceiling-workers"}  # each one's ceiling
RATIO_GOAL = 1.7  # workers req/s over single req/s, at least
TAIL_GOAL = 4.0  # the workers' p99 over their p50, at most
SHARE_GOALS = {"predict": 0.5, "adapt": 0.3}  # share of the ceiling, at least
WARM_S = 1  # the unmeasured run before each measured one (wrk takes whole seconds)


@dataclass(frozen=True)
class Measured:
    run: Run
    batch: float  # mean jobs per engine batch of the workload's kind meanwhile (0: a ceiling)
    repeated: bool = False  # a text run sent more requests than its file held (texts again)


Results = dict[tuple[str, str], list[Measured]]  # (mode, workload): one per repeat


def measure(
    srv: Server,
    workload: str,
    connections: int,
    seconds: int,
    warm: dict[str, str],
    env: dict[str, str],
) -> Measured:
    """One wrk run of ``workload`` (its script's ``env``) after an unmeasured one
    (``warm``: connections and threads up), and the mean batch the engine ran
    meanwhile, counted until the server is idle again (the requests wrk left running
    finish first, so no backlog runs into the next measurement)."""
    script = SINUSOID.get(workload, "replay.lua")
    wrk(srv.url, script, connections, WARM_S, srv.key, **warm)
    if not srv.engine:  # a ceiling: no engine, no queue, no batches
        return Measured(wrk(srv.url, script, connections, seconds, srv.key, **env), 0.0)
    wait_idle(srv)
    before = srv.stats()[KIND[workload]]
    run = wrk(srv.url, script, connections, seconds, srv.key, **env)
    wait_idle(srv)
    after = srv.stats()[KIND[workload]]
    batches = after["batches"] - before["batches"]
    return Measured(run, (after["jobs"] - before["jobs"]) / max(1, batches))


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="front processes of 'workers'")
    p.add_argument("--concurrency", type=int, default=64, help="wrk connections")
    p.add_argument("--seconds", type=int, default=5, help="per wrk run (sinusoid)")
    p.add_argument("--text-seconds", type=int, default=20, help="per wrk run (text)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=1000, help="seeded sinusoid clients")
    p.add_argument("--text-clients", type=int, default=200, help="seeded intents clients")
    p.add_argument("--database-url", default=None, help="default: SQLite in a temp dir each")
    p.add_argument("--seed", type=int, default=0, help="of the texts and text clients")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, help="default: all four")
    args = p.parse_args()
    if args.workers < 2:
        p.error("--workers must be at least 2 (1 is the single process)")
    workloads = [w for w in WORKLOADS if not args.workloads or w in args.workloads]
    require_wrk()
    print(f"fastadapt bench_workers: {machine()}")

    bodies = Bodies(args.text_clients, args.seed)
    results: Results = {}
    with ExitStack() as stack:
        files = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-workers-")))
        servers: dict[str, Server] = {}
        for mode, workers in zip(FASTADAPT, (1, args.workers), strict=True):
            url = None  # SQLite in the server's data directory
            if args.database_url:  # its own database: servers share no tables
                url = stack.enter_context(fresh_database(args.database_url))
            env = {**AUTH, "FASTADAPT_WORKERS": str(workers)}
            servers[mode] = stack.enter_context(server(env, url, tenant="bench"))
        sinusoid = any(w in SINUSOID for w in workloads)
        if sinusoid:  # the ceilings answer these two only
            servers["ceiling"] = stack.enter_context(ceiling())
            servers["ceiling-workers"] = stack.enter_context(ceiling(args.workers))
        seeds = bodies.seeds() if "text-predict" in workloads else []  # text-adapt: new ones
        for mode in FASTADAPT:
            if sinusoid:
                seed_clients(servers[mode], args.clients)
            if seeds:
                post_all(servers[mode], seeds)
        seeded = [f"{args.clients} sinusoid clients"] if sinusoid else []
        seeded += [f"{len(seeds)} intents clients"] if seeds else []
        settings = {mode: describe(servers[mode]) for mode in FASTADAPT}
        seen_rps = dict(GUESS_RPS)
        for workload in workloads:
            modes = list(servers) if workload in SINUSOID else list(FASTADAPT)
            for repeat in range(args.repeats):
                lines: int | None = None
                seconds = args.seconds if workload in SINUSOID else args.text_seconds
                if workload in SINUSOID:
                    warm = measured = {"CLIENTS": str(args.clients)}
                else:  # new texts, sized for the fastest rate seen so far, and some
                    lines = request_lines(seen_rps[workload], seconds, args.concurrency)
                    warm_lines = request_lines(seen_rps[workload], WARM_S, args.concurrency)
                    name = f"{workload}-{repeat}"
                    warm = text_requests(bodies, workload, warm_lines, files / f"{name}-warm.txt")
                    measured = text_requests(bodies, workload, lines, files / f"{name}.txt")
                for mode in modes:  # turns, so drift hits all alike
                    srv = servers[mode]
                    m = measure(srv, workload, args.concurrency, seconds, warm, measured)
                    if lines is not None:
                        repeated = m.run.rps * seconds > lines
                        m = Measured(m.run, m.batch, repeated)
                        seen_rps[workload] = max(seen_rps[workload], m.run.rps)
                    results.setdefault((mode, workload), []).append(m)

    for mode, line in settings.items():
        print(f"{mode}: {line}")
    database = "SQLite"
    if args.database_url:
        database = f"PostgreSQL, a fresh database per server beside {args.database_url}"
    print(
        f"wrk -t1, {args.concurrency} connections, {args.seconds} s runs "
        f"({args.text_seconds} s text runs) after {WARM_S} s unmeasured, median of "
        f"{args.repeats} (servers take turns); seeded: {', '.join(seeded) or 'none'}; auth on "
        f"(a key on every request); database: {database}; load average after: {load()}\n"
    )
    errors = report_workers(results, workloads, args.concurrency, args.workers)
    errors += report_ceiling(results, workloads, args.concurrency)
    if errors:
        print(f"\nnon-2xx responses or socket errors: {errors} (a 4xx or 5xx voids the run)")


def describe(srv: Server) -> str:
    """A fastadapt server's engine settings and its processes (a check that ``workers``
    runs as it should: N fronts and one engine process under ``serve``)."""
    children = len(processes(srv.pid)) - 1 if srv.pid is not None else 0
    return f"{threads(srv.stats())}; {children} child processes"


def request_lines(rps: float, seconds: int, connections: int) -> int:
    """How many requests of new texts a run of ``seconds`` needs at ``rps``, and some."""
    return int(rps * seconds * 1.5) + 2 * connections


def text_requests(bodies: Bodies, workload: str, lines: int, path: Path) -> dict[str, str]:
    """A request file of ``lines`` requests of new texts; replay.lua's environment."""
    return {"REQUESTS": str(write_requests(bodies.workload(TEXT[workload], lines), path))}


def report_workers(
    results: Results, workloads: Sequence[str], connections: int, workers: int
) -> int:
    """The workers against the single process, with the goals; the errors counted."""
    print(
        f"workers ({workers} fronts + 1 engine process) against single (one process); goals: "
        f"req/s ratio >= {RATIO_GOAL}, workers' p99 <= {TAIL_GOAL:g}x their p50\n"
    )
    print(
        "| workload | conns | single req/s | p50 ms | p99 ms | mean batch | workers req/s "
        "| p50 ms | p99 ms | mean batch | workers/single | workers p99/p50 | goals |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    errors = 0
    notes = []
    for workload in workloads:
        ones, many = results[("single", workload)], results[("workers", workload)]
        s, w = median([m.run for m in ones]), median([m.run for m in many])
        errors += s.errors + w.errors
        ratio = statistics.median(
            _ratio(x.run.rps, y.run.rps) for x, y in zip(many, ones, strict=True)
        )
        tail = _ratio(w.p99_ms, w.p50_ms)
        shown = f"{ratio:.2f}x | {tail:.1f}"
        if s.errors + w.errors:  # a fast 503 is no answer: its rate and latency mislead
            verdict = f"void: {s.errors + w.errors} non-2xx responses or socket errors"
        elif min(m.run.rps for m in ones + many) == 0:
            shown, verdict = "- | -", "no verdict: a run got no answer (make the runs longer)"
        else:
            verdict = f"ratio {_met(ratio >= RATIO_GOAL)}, tail {_met(tail <= TAIL_GOAL)}"
        if any(m.repeated for m in ones + many):
            notes.append(f"{workload}: a run sent more requests than its file held")
        print(
            f"| {workload} | {connections} | {s.rps:,.1f} | {s.p50_ms:.1f} | {s.p99_ms:.1f} "
            f"| {_batch(ones)} | {w.rps:,.1f} | {w.p50_ms:.1f} | {w.p99_ms:.1f} "
            f"| {_batch(many)} | {shown} | {verdict} |"
        )
    print(
        "\nmean batch: jobs per engine batch of the workload's kind (/v1/engine/stats; in "
        "workers mode the engine process's; text predictions count encode passes too); "
        "workers/single: the median of each repeat's ratio"
    )
    for note in notes:
        print(f"note: {note} (texts repeated: cached embeddings)")
    return errors


def report_ceiling(results: Results, workloads: Sequence[str], connections: int) -> int:
    """Each fastadapt server's share of its HTTP ceiling, with the goals; the errors
    counted. Only the sinusoid workloads (the ceilings run only those)."""
    sinusoid = [w for w in workloads if w in SINUSOID]
    if not sinusoid:
        return 0
    print(
        "\nshare of the HTTP ceiling (benchmarks/ceiling.py: same routes and schemas, same "
        "uvicorn, constant answers): single over ceiling, workers over ceiling-workers; "
        "goals: " + ", ".join(f"{w} >= {SHARE_GOALS[w]}" for w in sinusoid) + "\n"
    )
    print(
        "| workload | conns | ceiling req/s | single req/s | share | ceiling-workers req/s "
        "| workers req/s | share | goal |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    errors = 0
    for workload in sinusoid:
        cells, verdicts = [], []
        for mode in FASTADAPT:
            ceil = results[(CEILINGS[mode], workload)]
            ours = results[(mode, workload)]
            c, o = median([m.run for m in ceil]), median([m.run for m in ours])
            errors += c.errors + o.errors
            share = statistics.median(
                _ratio(x.run.rps, y.run.rps) for x, y in zip(ours, ceil, strict=True)
            )
            cells.append(f"{c.rps:,.0f} | {o.rps:,.0f} | {share:.2f}")
            met = "void (errors)" if c.errors + o.errors else _met(share >= SHARE_GOALS[workload])
            verdicts.append(f"{mode} {met}")
        print(
            f"| {workload} | {connections} | {' | '.join(cells)} "
            f"| {', '.join(verdicts)} (>= {SHARE_GOALS[workload]}) |"
        )
    print("\nshare: the median of each repeat's ratio")
    return errors


def _batch(runs: Sequence[Measured]) -> str:
    size = statistics.median(m.batch for m in runs)
    return f"{size:.1f}" if size else "-"


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


if __name__ == "__main__":
    main()
