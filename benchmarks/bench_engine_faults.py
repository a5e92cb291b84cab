"""The engine process killed under load: ``fastadapt serve --workers 2`` on PostgreSQL.

    python -m benchmarks.bench_engine_faults --database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
        [--rounds 5] [--threads 8] [--workers 2]

One server (auth on) on a fresh database of its own on that PostgreSQL server (dropped
at the end). ``--threads`` threads adapt the shipped sinusoid for a few clients without
pause; each round, once adaptations are being acknowledged, the engine process gets
SIGKILL. Per round it prints what the clients saw (answers by status, every Retry-After),
how long until an adaptation sent after the kill is acknowledged, whether the fronts are
the same processes, and then, reading every client back: acknowledged versions missing
(must be 0) and stored versions that predict.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.serving import Server, fresh_database, machine, processes, server

CLIENTS = [f"fault-{i}" for i in range(6)]
XS = [[-4.0], [-2.5], [-1.0], [0.5], [2.0], [3.5]]


@dataclass
class Round:
    acked: list[tuple[str, int]] = field(default_factory=list)
    refused: Counter[tuple[int, str | None]] = field(
        default_factory=Counter
    )  # (status, Retry-After)
    lost_connections: int = 0
    killed_at: float = 0.0
    first_ack_after: float | None = None


def children(srv: Server) -> dict[str, set[int]]:
    """The server's fronts and engine process, by their command lines."""
    found: dict[str, set[int]] = {"_front": set(), "_engine": set()}
    assert srv.pid is not None
    for pid in processes(srv.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for role in found:
            if role.encode() in args:
                found[role].add(pid)
    return found


def load(srv: Server, stop: threading.Event, record: list[Round], seed: int) -> None:
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=60) as http:
        n = seed
        while not stop.is_set():
            client = CLIENTS[n % len(CLIENTS)]
            n += 1
            body = {
                "meta_model": "sinusoid",
                "support": {"inputs": XS, "targets": [((n % 7) + 1) * x[0] / 4 for x in XS]},
            }
            current = record[-1]
            sent = time.monotonic()
            try:
                answer = http.post(f"/v1/clients/{client}/adaptations", json=body)
            except httpx.TransportError:
                current.lost_connections += 1
                continue
            if answer.status_code == 201:
                current.acked.append((client, answer.json()["version"]))
                if current.killed_at and sent > current.killed_at and not current.first_ack_after:
                    current.first_ack_after = time.monotonic() - current.killed_at
            else:
                current.refused[(answer.status_code, answer.headers.get("retry-after"))] += 1


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--database-url", required=True, help="a PostgreSQL server's URL")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    print(f"fastadapt bench_engine_faults: {machine()}")
    env = {
        "FASTADAPT_AUTH": "required",
        "FASTADAPT_WORKERS": str(args.workers),
        "FASTADAPT_VERSIONS_KEPT": "1000000",  # retention must not prune what is checked
    }
    with fresh_database(args.database_url) as url, server(env, url, tenant="faults") as srv:
        record = [Round()]
        stop = threading.Event()
        threads = [
            threading.Thread(target=load, args=(srv, stop, record, i * 1000))
            for i in range(args.threads)
        ]
        for thread in threads:
            thread.start()
        fronts = children(srv)["_front"]
        rounds: list[Round] = []
        try:
            for _ in range(args.rounds):
                time.sleep(2.0)  # acknowledgements before the kill
                engine = children(srv)["_engine"]
                current = record[-1]
                current.killed_at = time.monotonic()
                for pid in engine:
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 120
                while current.first_ack_after is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(1.0)
                rounds.append(current)
                record.append(Round())
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        same_fronts = children(srv)["_front"] == fronts
        with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=60) as http:
            stored = {
                client: {v["version"] for v in http.get(f"/v1/clients/{client}").json()["versions"]}
                for client in CLIENTS
            }
            predicting = sum(
                http.post(
                    f"/v1/clients/{c}/predictions", json={"inputs": XS, "version": v}
                ).status_code
                == 200
                for c, versions in stored.items()
                for v in versions
            )
    print(
        f"{args.workers} fronts, {args.threads} threads adapting {len(CLIENTS)} clients "
        f"without pause; PostgreSQL; the engine process killed (SIGKILL) once per round\n"
    )
    print(
        "| round | acked | refused (status, Retry-After: count) | connections lost "
        "| first ack after the kill | acked and missing |"
    )
    print("|---:|---:|---|---:|---:|---:|")
    missing_all = 0
    for i, r in enumerate(rounds, 1):
        missing = sum(v not in stored.get(c, set()) for c, v in r.acked)
        missing_all += missing
        refused = ", ".join(f"{s} {a}: {n}" for (s, a), n in sorted(r.refused.items())) or "none"
        after = "none" if r.first_ack_after is None else f"{r.first_ack_after:.1f} s"
        print(f"| {i} | {len(r.acked)} | {refused} | {r.lost_connections} | {after} | {missing} |")
    versions = sum(len(v) for v in stored.values())
    print(
        f"\nstored versions {versions}, of which predict: {predicting}; acknowledged and "
        f"missing: {missing_all}; the same front processes throughout: {same_fronts}"
    )


if __name__ == "__main__":
    main()
