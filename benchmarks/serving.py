"""What the HTTP benchmarks share: a real ``fastadapt serve`` process, wrk, the machine line.

wrk (closed loop, one thread, a Lua script makes the bodies) leaves the server most of
the machine; a Python load generator would eat one of its two cores.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx responses and socket errors


@dataclass(frozen=True)
class Server:
    url: str
    data_dir: Path  # its SQLite database lives here unless a URL was given
    key: str | None = None  # an API key of the server's tenant, when it was given one
    engine: bool = True  # False: the ceiling app (benchmarks/ceiling.py), no engine stats
    pid: int | None = None  # the server process's (to profile it)

    @property
    def headers(self) -> dict[str, str]:
        """What every request to it carries (the key, if any)."""
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def stats(self) -> dict[str, Any]:
        response = httpx.get(self.url + "/v1/engine/stats", headers=self.headers, timeout=30)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk (or `make bench`, which does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(
    env: dict[str, str], database_url: str | None = None, *, tenant: str | None = None
) -> Iterator[Server]:
    """``fastadapt serve`` on a free port, with ``env`` over this environment, a fresh
    data directory (SQLite, migrated by ``serve``) unless ``database_url`` is given; with
    ``tenant``, a key of that tenant created first (``Server.key``)."""
    with tempfile.TemporaryDirectory(prefix="fastadapt-bench-") as data:
        # the workloads adapt the shipped sinusoid with 10 inner steps (benchmarks/wrk),
        # beyond the 5 it was meta-trained for: allowed here, as the numbers were measured
        allowed = {"FASTADAPT_ALLOW_UNTRAINED": "true"}
        full = {**os.environ, **allowed, **env, "FASTADAPT_DATA_DIR": data}
        if database_url:
            full["FASTADAPT_DATABASE_URL"] = database_url
        key = None if tenant is None else create_key(full, tenant)
        port = free_port()
        log = Path(data) / "server.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                env=full,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, proc, log)
            yield Server(url, Path(data), key, pid=proc.pid)
        finally:
            stop(proc)


@contextmanager
def ceiling(workers: int = 1) -> Iterator[Server]:
    """The HTTP ceiling (``benchmarks/ceiling.py``) on a free port: the same routes and
    schemas under the same uvicorn settings, answering constants; with ``workers`` > 1,
    served by that many uvicorn worker processes."""
    with tempfile.TemporaryDirectory(prefix="fastadapt-ceiling-") as data:
        port = free_port()
        log = Path(data) / "server.log"
        command = [sys.executable, "-m", "benchmarks.ceiling", "--port", str(port)]
        if workers != 1:
            command += ["--workers", str(workers)]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=HERE.parent,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, proc, log)
            yield Server(url, Path(data), engine=False, pid=proc.pid)
        finally:
            stop(proc)


@contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """The URL of a new, empty database on ``url``'s PostgreSQL server (same user, a
    unique name), dropped on exit: one per server, so that servers of one benchmark share
    no tables, as their SQLite databases share none. ``url``'s own database is only where
    the CREATE and DROP run."""
    from sqlalchemy import create_engine, make_url, text

    base = make_url(url)
    if base.get_backend_name() != "postgresql":
        raise SystemExit("--database-url: PostgreSQL only (each server gets SQLite without it)")
    name = f"fastadapt_bench_{secrets.token_hex(6)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:  # FORCE: a killed server's sessions too
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def stop(proc: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    """SIGTERM (a graceful shutdown finishes the queued jobs), then SIGKILL after
    ``grace_s``: a server left with a long queue must not hide the error that ended
    the benchmark behind a timeout of its own."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_idle(srv: Server, limit_s: float = 300, window_s: float = 0.5) -> None:
    """Until ``srv`` has no job queued and its processes (``srv.pid`` and its children)
    used under a tenth of a core over ``window_s``: the backlog a closed-loop run leaves
    when wrk stops (its requests run to the end) must not run into the next measurement,
    of this server or another."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = _cpu_seconds(srv.pid)
        time.sleep(window_s)
        busy = _cpu_seconds(srv.pid) - before
        if srv.stats()["queued"] == 0 and busy < 0.1 * window_s:
            return
    raise RuntimeError(f"{srv.url} stayed busy for {limit_s:g} s")


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time so far of a process and of its live descendants (0 where
    /proc does not say): ``fastadapt serve --workers N`` and the ceiling's uvicorn workers
    do their work in child processes; a single-process server has none."""
    return 0.0 if pid is None else sum(processes(pid).values())


def processes(pid: int) -> dict[int, float]:
    """``pid`` and its live descendants, each with its user + system CPU seconds so far,
    from ``/proc/<pid>/stat`` (empty where there is no /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        child = int(stat.parent.name)
        parents[child] = int(fields[1])
        cpu[child] = (int(fields[11]) + int(fields[12])) / tick
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, [pid]
    while todo:
        current = todo.pop()
        if current in cpu:
            found[current] = cpu[current]
            todo += children.get(current, [])
    return found


def create_key(env: dict[str, str], tenant: str) -> str:
    """A new API key of ``tenant`` in ``env``'s database (migrated first): what
    ``fastadapt keys create`` prints alone on its last line. Admin scope, so that it may
    read ``/v1/engine/stats`` too; a request costs the same check either way."""
    cli = [sys.executable, "-m", "service.cli"]
    subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True)
    out = subprocess.run(
        [*cli, "keys", "create", "--tenant", tenant, "--scope", "admin"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip().splitlines()[-1].strip()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the server did not become ready:\n{tail}")
        time.sleep(0.2)


def post_all(
    srv: Server, posts: Sequence[tuple[str, Any]], expect: int = 201, workers: int = 16
) -> None:
    """POST each ``(path, json body)`` to ``srv`` (``workers`` at a time, with its key);
    raises unless every answer is ``expect``. To seed clients before a measurement."""
    http = httpx.Client(base_url=srv.url, timeout=120, headers=srv.headers)
    with http, ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(lambda post: http.post(post[0], json=post[1]), posts))
    bad = [f"{r.status_code} {r.text[:200]}" for r in answers if r.status_code != expect]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(posts)} requests failed: {bad[:3]}")


def wrk(
    url: str, script: str, connections: int, seconds: float, key: str | None = None, **env: str
) -> Run:
    """One wrk run of ``benchmarks/wrk/<script>``; ``env`` reaches the script (with a
    fresh ``SEED`` for its random clients unless given); with ``key``, every request
    carries ``Authorization: Bearer <key>``."""
    env.setdefault("SEED", str(random.randrange(2**31)))
    env["KEY"] = key or ""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            "--timeout",
            "30s",
            "-s",
            str(HERE / "wrk" / script),
            url,
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return Run(
        _number(r"Requests/sec:\s+([\d.]+)", out), _ms(r"\s50%", out), _ms(r"\s99%", out), errors
    )


def _number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    if found is None:
        raise RuntimeError(f"wrk printed no {pattern!r}:\n{text}")
    return float(found.group(1))


def _ms(label: str, text: str) -> float:
    found = re.search(label + r"\s+([\d.]+)(us|ms|s)\b", text)
    if found is None:
        raise RuntimeError(f"wrk printed no {label.strip()} latency:\n{text}")
    value, unit = found.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def machine() -> str:
    """CPU, cores, load, torch, and how uvicorn will serve (its HTTP parser and loop)."""
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    import torch

    return (
        f"{cpu}, {os.cpu_count()} cores, load average {load()}; torch {torch.__version__}; "
        f"uvicorn with {http} and {loop}"
    )


def load() -> str:
    """Load average, and how much of the last minute some task waited for a CPU (the
    benchmark's own processes count in both)."""
    text = " ".join(f"{x:.1f}" for x in os.getloadavg())
    pressure = Path("/proc/pressure/cpu")
    if pressure.exists():
        some = pressure.read_text().split("\n")[0]  # some avg10=... avg60=... avg300=...
        text += f", CPU pressure {some.split()[2].replace('avg60=', '')}% (1 min)"
    return text


def threads(stats: dict[str, Any]) -> str:
    """The thread settings a server reports (and the fixed ones)."""
    return (
        f"engine: {stats['threads']} torch intra-op thread(s), 1 inter-op, one device "
        f"worker thread; request threads = queue_size + max_batch_size = "
        f"{stats['queue_size'] + stats['max_batch_size']}; max_batch_size "
        f"{stats['max_batch_size']}, max_batch_delay_ms {stats['max_batch_delay_ms']:g}"
    )
