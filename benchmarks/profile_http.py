"""Where a request's time goes: py-spy on a real ``fastadapt serve`` under wrk load.

    pip install py-spy    # not a dependency of the project
    python -m benchmarks.profile_http [--workload predict] [--connections 64] [--seconds 12]

Starts a server with a key (auth on, as the benchmarks run), adapts ``--clients``
clients, drives the workload with wrk while py-spy samples the server (all threads, not
idle ones), and prints the heaviest frames: inclusive (a frame and what it calls) and
self (the frame alone), as shares of the samples. A profile slows the server it samples:
read shares, not rates.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from benchmarks.bench_http import seed_clients
from benchmarks.serving import require_wrk, server, wrk


def frames(raw: Path) -> tuple[Counter[str], Counter[str], int]:
    """(inclusive, self, total) sample counts of py-spy's raw output: one line per stack,
    "frame;frame;... count", frames named "function (file:line)"."""
    inclusive: Counter[str] = Counter()
    alone: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        names = [_name(frame) for frame in stack.split(";")[1:]]  # [0]: the thread
        for name in set(names):
            inclusive[name] += n
        if names:
            alone[names[-1]] += n
    return inclusive, alone, total


def _name(frame: str) -> str:
    """ "f (path/to/site-packages/pkg/mod.py:12)" -> "f (pkg/mod.py)"."""
    frame = re.sub(r":\d+\)$", ")", frame)
    return re.sub(r"\((?:.*/site-packages/|.*/(?=(?:service|models|benchmarks)/))", "(", frame)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--workload", choices=("predict", "adapt"), default="predict")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--seconds", type=int, default=12)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    require_wrk()
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is missing: pip install py-spy")
    script = f"{args.workload}.lua"
    with server({}, tenant="bench") as srv, tempfile.TemporaryDirectory() as tmp:
        seed_clients(srv, args.clients)
        wrk(srv.url, script, args.connections, 2, srv.key, CLIENTS=str(args.clients))  # warm
        raw = Path(tmp) / "profile.raw"
        assert srv.pid is not None
        record = [spy, "record", "--pid", str(srv.pid), "--duration", str(args.seconds)]
        record += ["--rate", "200", "--format", "raw", "--output", str(raw), "--nonblocking"]
        sampler = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = wrk(
            srv.url, script, args.connections, args.seconds, srv.key, CLIENTS=str(args.clients)
        )
        sampler.wait()
        inclusive, alone, total = frames(raw)
    print(
        f"{args.workload}, {args.connections} connections, {args.seconds} s: "
        f"{run.rps:.0f} requests/s under the profiler, {total} samples"
    )
    for title, counts in (("inclusive", inclusive), ("self", alone)):
        print(f"\n{title}")
        for name, n in counts.most_common(args.top):
            print(f"{n / total:6.1%}  {name}")


if __name__ == "__main__":
    main()
