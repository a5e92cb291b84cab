"""HTTP end to end: a real ``fastadapt serve`` under wrk, batching on against off.

    python -m benchmarks.bench_http [--concurrency 1 16 64] [--seconds 5] [--repeats 3]

Starts the server twice in this run, once with the engine's defaults and once with
``FASTADAPT_MAX_BATCH_SIZE=1``, each on a fresh SQLite database (or ``--database-url``).
For each, ``clients`` clients are adapted once, then wrk (closed loop, one thread, so the
server keeps most of the machine) drives adaptations and predictions for random clients
at each concurrency. Prints requests/s and p50/p99 latency, medians over repeats.
Needs wrk (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).parent
MODES = {"batched": {}, "unbatched": {"FASTADAPT_MAX_BATCH_SIZE": "1"}}


@dataclass(frozen=True)
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(env: dict[str, str], database_url: str | None) -> Iterator[str]:
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        full = {**os.environ, **env, "FASTADAPT_DATA_DIR": data}
        if database_url:
            full["FASTADAPT_DATABASE_URL"] = database_url
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            env=full,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(url + "/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the server did not become ready")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def seed_clients(url: str, clients: int) -> None:
    body = {
        "meta_model": "sinusoid",
        "support": {
            "inputs": [[x / 2] for x in range(-5, 5)],
            "targets": [0.1 * x for x in range(-5, 5)],
        },
    }
    with httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(8) as pool:
        codes = pool.map(
            lambda n: http.post(f"/v1/clients/bench-{n}/adaptations", json=body).status_code,
            range(clients),
        )
        bad = [c for c in codes if c != 201]
    if bad:
        raise RuntimeError(f"seeding clients failed: {bad[:5]}")


def to_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(url: str, script: str, connections: int, seconds: float, clients: int) -> Run:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "--timeout",
            "30s",
            "-s",
            str(HERE / "wrk" / script),
            url,
        ],
        env={**os.environ, "CLIENTS": str(clients)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = to_ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = to_ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Run(rps, p50, p99, int(errors.group(1)) if errors else 0)


def median_run(runs: list[Run]) -> Run:
    return Run(
        statistics.median(r.rps for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
        sum(r.errors for r in runs),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk")

    results: dict[tuple[str, str, int], Run] = {}
    for mode, env in MODES.items():
        with server(env, args.database_url) as url:
            seed_clients(url, args.clients)
            for script in ("adapt.lua", "predict.lua"):
                for c in args.concurrency:
                    runs = [
                        wrk(url, script, c, args.seconds, args.clients) for _ in range(args.repeats)
                    ]
                    results[(mode, script, c)] = median_run(runs)

    threads = os.environ.get("FASTADAPT_THREADS", "the default")
    print(
        f"{os.cpu_count()} cores; engine threads: {threads}; wrk -t1, {args.seconds}s runs, "
        f"median of {args.repeats}; {args.clients} clients; "
        f"database: {args.database_url or 'SQLite'}"
    )
    print()
    print(
        "| workload | conns | batched req/s | p50 ms | p99 ms | unbatched req/s | p50 ms "
        "| p99 ms | throughput ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for script in ("adapt.lua", "predict.lua"):
        for c in args.concurrency:
            b, u = results[("batched", script, c)], results[("unbatched", script, c)]
            print(
                f"| {script[:-4]} | {c} | {b.rps:.0f} | {b.p50_ms:.1f} | {b.p99_ms:.1f} "
                f"| {u.rps:.0f} | {u.p50_ms:.1f} | {u.p99_ms:.1f} | {b.rps / u.rps:.2f}x |"
            )
    errors = sum(r.errors for r in results.values())
    if errors:
        print(f"\nnon-2xx responses: {errors}")


if __name__ == "__main__":
    main()
