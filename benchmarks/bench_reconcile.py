"""Serving latency with and without a reconcile job running, in the same run.

Adapts ``--clients`` clients on the shipped sinusoid (v1), restarts the server on the same
artifact with perturbed weights (v2), adapts a few clients on v2 to predict against, then
measures predictions over HTTP (a closed loop of ``--concurrency`` Python threads, each
request one client and 8 inputs) in ``--rounds`` turns: ``--seconds`` with no job, then
as long again while a reconcile job re-adapts the stale clients at
``FASTADAPT_RECONCILE_RATE`` (``--rate``) clients per second (the job is then cancelled,
and the next turn starts a new one on the clients still stale). Prints p50/p99 of both
and their ratio (goal: p99 within 2x).

    python -m benchmarks.bench_reconcile [--clients 300] [--seconds 5] [--rounds 3] [--rate 10]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from benchmarks.serving import machine, server
from models.checkpoint import MetaModel
from service.settings import packaged_models_dir

XS = [[-3.0], [-1.5], [-0.5], [1.0], [2.5]]
YS = [-0.1, -1.0, -1.4, 0.8, 1.9]
HOT = 16  # clients on v2 that the load predicts with
QUERY = {"inputs": [[x / 4.0] for x in range(-8, 8, 2)]}  # 8 inputs


def perturbed(source: Path, target: Path) -> None:
    """The artifact at ``source`` saved to ``target`` with other weights (v2)."""
    model = MetaModel.load(source)
    generator = torch.Generator().manual_seed(7)
    params = {
        n: t + 0.05 * torch.randn(t.shape, generator=generator) for n, t in model.params.items()
    }
    MetaModel(model.config, params, model.lrs, version="").save(target)


def adapt(client: httpx.Client, ids: list[str]) -> None:
    for i, client_id in enumerate(ids):
        ys = [y + 0.01 * i for y in YS]
        body = {"meta_model": "sinusoid", "support": {"inputs": XS, "targets": ys}}
        response = client.post(f"/v1/clients/{client_id}/adaptations", json=body)
        response.raise_for_status()


def load(url: str, seconds: float, concurrency: int) -> tuple[list[float], int]:
    """Latencies (ms) of a closed loop of predictions, and the non-200 answers."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[float] = []
        bad = 0
        with httpx.Client(base_url=url, timeout=30) as client:
            while time.monotonic() < deadline:
                client_id = f"hot{rng.randrange(HOT)}"
                started = time.perf_counter()
                response = client.post(f"/v1/clients/{client_id}/predictions", json=QUERY)
                mine.append((time.perf_counter() - started) * 1e3)
                bad += response.status_code != 200
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=300, help="stale clients (default 300)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per phase (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of both (default 3)")
    parser.add_argument("--concurrency", type=int, default=4, help="load threads (default 4)")
    parser.add_argument("--rate", type=float, default=10.0, help="reconcile clients/s (10)")
    parser.add_argument("--database-url", default="", help="default: a fresh SQLite file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fastadapt-reconcile-") as tmp:
        root = Path(tmp)
        shipped = packaged_models_dir() / "sinusoid"
        v1 = root / "v1"
        shutil.copytree(shipped, v1 / "sinusoid")
        perturbed(shipped, root / "v2" / "sinusoid")
        url = args.database_url or f"sqlite:///{root / 'bench.db'}"
        env = {"FASTADAPT_THREADS": "1", "FASTADAPT_ACCESS_LOG": "false"}
        v1_env = env | {"FASTADAPT_MODELS_DIR": str(v1)}
        with server(v1_env, url) as old, httpx.Client(base_url=old.url, timeout=30) as client:
            adapt(client, [f"stale{i:04d}" for i in range(args.clients)])
        on_v2 = env | {
            "FASTADAPT_MODELS_DIR": str(root / "v2"),
            "FASTADAPT_RECONCILE_RATE": f"{args.rate:g}",
            "FASTADAPT_RECONCILE_POLL_S": "0.2",
        }
        idle: list[float] = []
        busy: list[float] = []
        errors = {"no job": 0, "reconcile running": 0}
        done = 0
        with server(on_v2, url) as new, httpx.Client(base_url=new.url, timeout=30) as client:
            adapt(client, [f"hot{i}" for i in range(HOT)])
            load(new.url, 2.0, args.concurrency)  # warm-up: every hot client cached
            for _ in range(args.rounds):  # turns, so that the machine's drift hits both
                latencies, bad = load(new.url, args.seconds, args.concurrency)
                idle += latencies
                errors["no job"] += bad
                started = client.post("/v1/meta-models/sinusoid/reconcile")
                started.raise_for_status()
                job_id = started.json()["id"]
                latencies, bad = load(new.url, args.seconds, args.concurrency)
                busy += latencies
                errors["reconcile running"] += bad
                cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
                job = cancelled.json()
                assert cancelled.status_code == 200, cancelled.text  # still running
                done += job["done"]
                time.sleep(0.5)  # the client in hand finishes
        print(f"machine: {machine()}")
        print(
            f"{args.clients} stale clients, reconcile rate {args.rate:g}/s, "
            f"{args.concurrency} load threads, {args.rounds} turns of {args.seconds:g} s "
            f"without and with a job, {'PostgreSQL' if args.database_url else 'SQLite'}"
        )
        seconds = args.rounds * args.seconds
        print(f"clients reconciled while measured: {done} ({done / seconds:.1f}/s)")
        print(f"{'':24}{'requests':>10}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}")
        for label, values in (("no job", idle), ("reconcile running", busy)):
            print(
                f"{label:24}{len(values):>10}{errors[label]:>8}"
                f"{percentile(values, 50):>9.2f}{percentile(values, 99):>9.2f}"
            )
        print(
            f"ratio (running / none): p50 {percentile(busy, 50) / percentile(idle, 50):.2f}, "
            f"p99 {percentile(busy, 99) / percentile(idle, 99):.2f}"
        )


if __name__ == "__main__":
    main()
