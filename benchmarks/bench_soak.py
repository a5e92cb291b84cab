"""Soak: replicas on one PostgreSQL under a checked load, then a count in the database.

Starts real ``fastadapt serve`` replicas (``tests.live``) on a fresh schema of one
PostgreSQL database (created here, dropped at the end), with ``FASTADAPT_AUTH=required``
and a key made in the database, serving the shipped sinusoid. ``--threads`` Python
threads (httpx) then adapt and predict for ``--clients`` clients during ``--seconds``,
every request sent to a replica chosen round-robin (``--spread rr``, the default: a
client's requests land anywhere) or by a hash of the client id (``--spread hash``, as
the load balancer does). Each thread owns its own clients, so one client's requests are
serialised, and the generator always knows which version each client should answer from:

- every acknowledged adaptation (201) is recorded: client, version, ``version_id`` and a
  fingerprint, its predictions at a fixed query asked right after on *another* replica;
- every prediction (at that query) is checked: answered from the version the caller
  expects (``version_id`` == the client's last acknowledged one) and equal to the
  fingerprint (to 1e-5: a micro-batch of other clients may round differently; how many
  were bit-identical is printed too).

An adaptation that got no answer (a transport error or a 5xx) may or may not have been
stored: its client is retired for the rest of the run and the count below allows that
one version to be present or absent. A 422 (the guard refused it) stores nothing. Every
client is adapted once before the clock starts (warm-up, checked like the rest).

Then, in the database: every acknowledged version present (by its uid, under the same
client and number), no version beyond the acknowledged ones (a duplicate), each client's
versions contiguous from 1 with ``current_version`` the newest, every uid distinct.
It prints the counts (mismatches and missing must be 0: it exits 1 otherwise), req/s and
p50/p99 of adapt and predict, and the machine's load.

    python -m benchmarks.bench_soak [--replicas 2] [--seconds 60] [--clients 300]
    python -m benchmarks.bench_soak --capacity 1,3 --seconds 45 --turns 3

``--capacity 1,3`` starts the largest count of replicas once and measures each count in
``--turns`` alternating turns (``--seconds`` per count in all), sending the load to the
first N replicas only (the others idle): the capacity table. PostgreSQL:
``--database-url``, else ``FASTADAPT_TEST_POSTGRES_URL``, else the local server's
``test`` database.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from benchmarks.serving import load, machine
from service.settings import packaged_models_dir
from service.store import migrate
from service.store.session import connect, session_factory
from service.store.tables import Client, ClientVersion
from service.usecases import keys
from tests.live import Replica, clean_env, stop_all

TENANT = "soak"
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
QUERY = [[x / 2.0] for x in range(-9, 10, 2)]  # 10 fixed inputs: the fingerprint's query
TOLERANCE = 1e-5
START_TIMEOUT_S = 300.0  # replicas starting together on a busy 2-core machine
STEPS = 5  # the shipped sinusoid's trained inner steps (no ALLOW_UNTRAINED needed)


# -- what the generator knows and counts ---------------------------------------------------
@dataclass
class Ledger:
    """One client, as its owning thread knows it."""

    acked: list[tuple[int, str]] = field(default_factory=list)  # (version, version_id)
    fingerprint: list[float] | None = None  # predictions of the last acked version at QUERY
    retired: bool = False  # an adaptation got no answer: it may or may not be stored


@dataclass
class Tally:
    """What one thread saw during one turn (summed over threads afterwards)."""

    adapt_ms: list[float] = field(default_factory=list)
    predict_ms: list[float] = field(default_factory=list)
    acked: int = 0
    refused: int = 0  # 422: the guard kept the current version
    unanswered: int = 0  # transport error or 5xx on an adaptation (client retired)
    checked: int = 0  # predictions checked against the ledger
    identical: int = 0  # ... of which bit-identical to the fingerprint
    wrong_version: int = 0
    wrong_value: int = 0
    predict_errors: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.adapt_ms += other.adapt_ms
        self.predict_ms += other.predict_ms
        for name in (
            "acked",
            "refused",
            "unanswered",
            "checked",
            "identical",
            "wrong_version",
            "wrong_value",
            "predict_errors",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.notes += other.notes[: max(0, 5 - len(self.notes))]

    def note(self, message: str) -> None:
        if len(self.notes) < 5:
            self.notes.append(message)


def support(rng: random.Random) -> dict[str, Any]:
    """An adaptation body: 10 points of a random sinusoid, 5 inner steps."""
    amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0.0, math.pi)
    xs = [rng.uniform(-5.0, 5.0) for _ in range(10)]
    return {
        "meta_model": "sinusoid",
        "inner_steps": STEPS,
        "support": {
            "inputs": [[x] for x in xs],
            "targets": [amplitude * math.sin(x - phase) for x in xs],
        },
    }


# -- one thread of load --------------------------------------------------------------------
class Worker:
    """Adapts and predicts for its own clients on ``targets`` (one httpx client each)."""

    def __init__(
        self,
        index: int,
        ledgers: dict[str, Ledger],
        targets: list[httpx.Client],
        spread: str,
        adapt_share: float,
    ) -> None:
        self.rng = random.Random(index)
        self.ledgers = ledgers
        self.targets = targets
        self.spread = spread
        self.adapt_share = adapt_share
        self.turn = index  # round-robin position
        self.tally = Tally()

    def pick(self, client_id: str) -> int:
        if self.spread == "hash":
            return zlib.crc32(client_id.encode()) % len(self.targets)
        self.turn += 1
        return self.turn % len(self.targets)

    def warm(self) -> None:
        """Adapt every client once (untimed)."""
        for client_id, ledger in self.ledgers.items():
            while not ledger.acked and not ledger.retired:
                self.adapt(client_id, ledger)

    def run(self, deadline: float) -> None:
        live = [c for c, ledger in self.ledgers.items() if not ledger.retired]
        while live and time.monotonic() < deadline:
            client_id = self.rng.choice(live)
            ledger = self.ledgers[client_id]
            if ledger.fingerprint is None or self.rng.random() < self.adapt_share:
                self.adapt(client_id, ledger)
                if ledger.retired:
                    live.remove(client_id)
            else:
                self.predict(client_id, ledger)

    def adapt(self, client_id: str, ledger: Ledger) -> None:
        at = self.pick(client_id)
        started = time.perf_counter()
        try:
            response = self.targets[at].post(
                f"/v1/clients/{client_id}/adaptations", json=support(self.rng)
            )
        except httpx.TransportError as error:
            self.tally.unanswered += 1
            self.tally.note(f"adapt {client_id}: {error!r}")
            ledger.retired = True
            return
        self.tally.adapt_ms.append((time.perf_counter() - started) * 1e3)
        if response.status_code == 422:
            self.tally.refused += 1
            return
        if response.status_code not in (200, 201):
            self.tally.unanswered += 1
            self.tally.note(f"adapt {client_id}: {response.status_code} {response.text[:200]}")
            ledger.retired = True
            return
        body = response.json()
        expected = (ledger.acked[-1][0] + 1) if ledger.acked else 1
        if body["version"] != expected:
            self.tally.wrong_version += 1
            self.tally.note(f"adapt {client_id}: version {body['version']}, not {expected}")
        ledger.acked.append((body["version"], body["version_id"]))
        ledger.fingerprint = None
        self.tally.acked += 1
        # the fingerprint: asked of another replica right away (read-your-writes)
        other = (at + 1) % len(self.targets)
        predicted = self.ask(client_id, other)
        if predicted is not None:
            if predicted["version_id"] != body["version_id"]:
                self.tally.wrong_version += 1
                self.tally.note(f"{client_id}: read {predicted['version']} after acking it")
            else:
                ledger.fingerprint = predicted["predictions"]

    def predict(self, client_id: str, ledger: Ledger) -> None:
        assert ledger.fingerprint is not None
        predicted = self.ask(client_id, self.pick(client_id))
        if predicted is None:
            return
        self.tally.checked += 1
        if predicted["version_id"] != ledger.acked[-1][1]:
            self.tally.wrong_version += 1
            self.tally.note(
                f"predict {client_id}: version {predicted['version']}, "
                f"expected {ledger.acked[-1][0]}"
            )
            return
        values: list[float] = predicted["predictions"]
        if values == ledger.fingerprint:
            self.tally.identical += 1
        elif any(
            abs(a - b) > TOLERANCE * (1 + abs(b))
            for a, b in zip(values, ledger.fingerprint, strict=True)
        ):
            self.tally.wrong_value += 1
            self.tally.note(f"predict {client_id}: {values[:3]} vs {ledger.fingerprint[:3]}")

    def ask(self, client_id: str, at: int) -> dict[str, Any] | None:
        """A timed prediction at QUERY from replica ``at``; None (counted) unless 200."""
        started = time.perf_counter()
        try:
            response = self.targets[at].post(
                f"/v1/clients/{client_id}/predictions", json={"inputs": QUERY}
            )
        except httpx.TransportError as error:
            self.tally.predict_errors += 1
            self.tally.note(f"predict {client_id}: {error!r}")
            return None
        self.tally.predict_ms.append((time.perf_counter() - started) * 1e3)
        if response.status_code != 200:
            self.tally.predict_errors += 1
            self.tally.note(f"predict {client_id}: {response.status_code} {response.text[:200]}")
            return None
        result: dict[str, Any] = response.json()
        if response.headers.get("etag", "").removeprefix("W/").strip('"') != result["version_id"]:
            self.tally.wrong_version += 1
            self.tally.note(f"predict {client_id}: ETag {response.headers.get('etag')}")
        return result


def in_threads(workers: list[Worker], work: str, deadline: float = 0.0) -> float:
    """Run every worker's ``warm`` or ``run`` in its own thread; the seconds it took."""
    started = time.monotonic()
    threads = [
        threading.Thread(target=w.warm if work == "warm" else lambda w=w: w.run(deadline))
        for w in workers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - started


# -- the deployment ------------------------------------------------------------------------
@contextmanager
def schema(server: str) -> Iterator[str]:
    """A fresh schema of ``server``'s database, migrated; dropped afterwards."""
    name = f"fastadapt_soak_{uuid.uuid4().hex[:12]}"
    admin = connect(server)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{name}"'))
        url = make_url(server).update_query_dict({"options": f"-csearch_path={name}"})
        rendered = url.render_as_string(hide_password=False)
        migrate.upgrade(rendered)
        yield rendered
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        admin.dispose()


def client_key(database_url: str) -> str:
    database = connect(database_url)
    try:
        with session_factory(database)() as session:
            return keys.create(session=session, tenant_id=TENANT, scope="client").token
    finally:
        database.dispose()


# -- the count in the database -------------------------------------------------------------
@dataclass
class Count:
    acked: int = 0
    stored: int = 0
    missing: int = 0  # an acked version absent, or stored under another client/number
    duplicates: int = 0  # a version no acknowledgement accounts for
    unacked_present: int = 0  # the one version a retired client's lost answer may have made
    gaps: int = 0  # clients whose versions are not 1..n, or whose current is not the newest
    notes: list[str] = field(default_factory=list)


def count(database_url: str, ledgers: dict[str, Ledger]) -> Count:
    database = connect(database_url)
    try:
        with session_factory(database)() as session:
            rows = session.execute(
                select(ClientVersion.client_id, ClientVersion.version, ClientVersion.uid).where(
                    ClientVersion.tenant_id == TENANT
                )
            ).all()
            currents: dict[str, int] = {
                client_id: current
                for client_id, current in session.execute(
                    select(Client.client_id, Client.current_version).where(
                        Client.tenant_id == TENANT
                    )
                )
            }
    finally:
        database.dispose()
    result = Count(stored=len(rows))
    stored: dict[str, dict[int, str]] = {}
    for client_id, version, uid in rows:
        stored.setdefault(client_id, {})[version] = uid
    by_uid = {uid: (client_id, version) for client_id, version, uid in rows}
    if len(by_uid) != len(rows):
        result.duplicates += len(rows) - len(by_uid)
        result.notes.append("a uid appears twice")
    for client_id in sorted(set(ledgers) | set(stored)):
        ledger = ledgers.get(client_id, Ledger())
        versions = stored.get(client_id, {})
        result.acked += len(ledger.acked)
        for version, uid in ledger.acked:
            if by_uid.get(uid) != (client_id, version):
                result.missing += 1
                result.notes.append(f"{client_id} v{version} ({uid}) missing")
        extra = sorted(set(versions) - {version for version, _ in ledger.acked})
        newest = ledger.acked[-1][0] if ledger.acked else 0
        if ledger.retired and extra == [newest + 1]:
            result.unacked_present += 1
        elif extra:
            result.duplicates += len(extra)
            result.notes.append(f"{client_id}: versions {extra} were never acknowledged")
        if versions and (
            sorted(versions) != list(range(1, len(versions) + 1))
            or currents.get(client_id) != max(versions)
        ):
            result.gaps += 1
            result.notes.append(
                f"{client_id}: {sorted(versions)}, current {currents.get(client_id)}"
            )
    return result


# -- printing --------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def line(label: str, tally: Tally, seconds: float) -> str:
    adapts, predicts = len(tally.adapt_ms), len(tally.predict_ms)
    return (
        f"{label:>10}{adapts / seconds:>9.1f}{pct(tally.adapt_ms, 50):>8.1f}"
        f"{pct(tally.adapt_ms, 99):>8.1f}{predicts / seconds:>10.1f}"
        f"{pct(tally.predict_ms, 50):>8.1f}{pct(tally.predict_ms, 99):>8.1f}"
        f"{(adapts + predicts) / seconds:>9.1f}"
    )


HEADER = (
    f"{'replicas':>10}{'adapt/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'predict/s':>10}"
    f"{'p50 ms':>8}{'p99 ms':>8}{'total/s':>9}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--replicas", type=int, default=2, help="replicas (default 2)")
    parser.add_argument("--capacity", default="", help="e.g. 1,3: compare these counts")
    parser.add_argument("--seconds", type=float, default=60.0, help="per count (default 60)")
    parser.add_argument("--turns", type=int, default=1, help="alternating turns per count")
    parser.add_argument("--clients", type=int, default=300, help="clients (default 300)")
    parser.add_argument("--threads", type=int, default=8, help="load threads (default 8)")
    parser.add_argument("--adapt-share", type=float, default=0.2, help="of requests (0.2)")
    parser.add_argument("--spread", choices=("rr", "hash"), default="rr")
    parser.add_argument("--database-url", default="", help="a PostgreSQL server URL")
    args = parser.parse_args()
    counts = [int(n) for n in args.capacity.split(",")] if args.capacity else [args.replicas]
    server = args.database_url or os.environ.get("FASTADAPT_TEST_POSTGRES_URL") or DEFAULT_URL
    if not server.startswith("postgresql"):
        raise SystemExit(f"the soak needs PostgreSQL, not {make_url(server).drivername}")
    print(f"machine: {machine()}")

    ledgers = [
        {f"soak{i:04d}": Ledger() for i in range(t, args.clients, args.threads)}
        for t in range(args.threads)
    ]
    everyone = {c: ledger for mine in ledgers for c, ledger in mine.items()}
    totals = {n: Tally() for n in counts}
    elapsed = dict.fromkeys(counts, 0.0)
    with tempfile.TemporaryDirectory(prefix="fastadapt-soak-") as tmp, schema(server) as url:
        models = Path(tmp) / "models"  # the shipped sinusoid alone: a lighter start-up
        shutil.copytree(packaged_models_dir() / "sinusoid", models / "sinusoid")
        env = clean_env(
            database_url=url,
            models_dir=models,
            data_dir=Path(tmp) / "data",
            auth="required",
            threads="1",
            access_log="false",
            versions_kept="1000000",  # retention must keep every version this run counts
        )
        replicas = [Replica(f"r{i}", env, Path(tmp) / f"r{i}.log") for i in range(max(counts))]
        key = client_key(url)
        targets = [r.client(key, timeout=60) for r in replicas]
        try:
            for replica in replicas:  # their start-ups overlap; a loaded machine is slow
                replica.start()
            for replica in replicas:
                replica.wait_ready(timeout=START_TIMEOUT_S)
            warm = Tally()
            workers = [
                Worker(t, ledgers[t], targets, args.spread, 1.0) for t in range(args.threads)
            ]
            took = in_threads(workers, "warm")
            for w in workers:
                warm.add(w.tally)
            print(
                f"warm-up: {len(everyone)} clients adapted on {len(targets)} replica(s) "
                f"in {took:.1f} s"
            )
            for turn in range(args.turns):
                for n in counts:
                    workers = [
                        Worker(
                            t * 1000 + turn, ledgers[t], targets[:n], args.spread, args.adapt_share
                        )
                        for t in range(args.threads)
                    ]
                    deadline = time.monotonic() + args.seconds / args.turns
                    elapsed[n] += in_threads(workers, "run", deadline)
                    for w in workers:
                        totals[n].add(w.tally)
            during = load()
        finally:
            for target in targets:
                target.close()
            codes = stop_all(*replicas)
        tally = Tally()
        tally.add(warm)
        for n in counts:
            tally.add(totals[n])
        found = count(url, everyone)

    print(
        f"{args.clients} clients, {args.threads} load threads (httpx, in this process), "
        f"{args.adapt_share:g} of requests adapt (10 points, {STEPS} steps), predictions of "
        f"{len(QUERY)} inputs; spread {args.spread}; PostgreSQL, auth required, "
        f"1 torch thread per replica; {args.seconds:g} s per count in {args.turns} turn(s)"
    )
    print(f"load average at the end: {during}")
    own, servers = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    print(
        f"CPU seconds (user+sys, whole run incl. start-up): load generator "
        f"{own.ru_utime + own.ru_stime:.0f}, replicas {servers.ru_utime + servers.ru_stime:.0f}"
    )
    print(HEADER)
    for n in counts:
        print(line(str(n), totals[n], elapsed[n]))
    print(
        f"adaptations acked {tally.acked} (warm-up {warm.acked}), refused (422) "
        f"{tally.refused}, unanswered {tally.unanswered}; predictions checked {tally.checked} "
        f"(bit-identical {tally.identical}), errors {tally.predict_errors}"
    )
    mismatches = tally.wrong_version + tally.wrong_value
    print(
        f"mismatches {mismatches} (version {tally.wrong_version}, value {tally.wrong_value}); "
        f"database: {found.stored} versions stored, {found.acked} acked, missing "
        f"{found.missing}, duplicates {found.duplicates}, unacked present "
        f"{found.unacked_present}, clients with gaps {found.gaps}; replicas exited {codes}"
    )
    for note in tally.notes + found.notes[:10]:
        print(f"  {note}")
    bad = (
        not tally.acked
        or not tally.checked
        or mismatches
        or found.missing
        or found.duplicates
        or found.gaps
        or any(codes)
    )
    print("FAIL" if bad else "OK")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
