#!/usr/bin/env python3
"""`make docker-smoke`: the compose deployment end to end, through its load balancer.

Builds the api and load-balancer images (cached), starts docker-compose.yml as its own
project (`fastadapt-smoke`, the load balancer on 127.0.0.1:18080) with three api replicas on
PostgreSQL, creates an admin key with `fastadapt keys create`, then:

1. adapts clients and predicts from each new version on the very next request;
2. stops one replica while adaptations and predictions continue: a request the load
   balancer could not place is retried here after a pause, and counted;
3. restarts the whole stack (`down` without `-v`, then `up`) and checks that every
   acknowledged version is still there and predicts exactly as before;

and tears the project down (its volume included) unless --keep. Exit status 0: all passed.

Standard library only; it runs with the system's python3. Docker: the `docker` CLI and
`docker compose` (or `docker-compose` 1.29+), talking to DOCKER_HOST's engine when set.
Build options (for engines whose builds need them): --build-network, --torch,
--torch-index, defaulting to DOCKER_BUILD_NETWORK, and to docker-here's DOCKER_HERE_TORCH /
DOCKER_HERE_INDEX exports (with them, builds use the host's network).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "fastadapt-smoke"
REPLICAS = 3
CLIENTS = 18
QUERY = (-3.0, -0.5, 0.5, 2.0, 4.5)
VERSIONS_KEPT = 10  # the server's default FASTADAPT_VERSIONS_KEPT: older versions are pruned
RETRYABLE = {502, 503, 504}  # the load balancer's (or a stopping replica's) transient answers
START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {message}", flush=True)


class SmokeError(Exception):
    """A check failed: the message says which and why."""


# -- docker ---------------------------------------------------------------------------------


def run(
    args: Sequence[str], *, env: dict[str, str] | None = None, quiet: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure show its output and raise."""
    if not quiet:
        log("$ " + shlex.join(args))
    done = subprocess.run(
        args, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    if done.returncode != 0:
        print(done.stdout, end="", flush=True)
        raise SmokeError(f"{shlex.join(args)} exited with {done.returncode}")
    return done


def compose_command() -> list[str]:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    return ["docker", "compose"] if probe.returncode == 0 else ["docker-compose"]


@dataclass
class Stack:
    compose: list[str]
    port: int

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "FASTADAPT_LB_BIND": "127.0.0.1",
            "FASTADAPT_LB_PORT": str(self.port),
        }

    def __call__(self, *args: str, quiet: bool = False) -> subprocess.CompletedProcess[str]:
        return run(
            [*self.compose, "-p", PROJECT, "-f", "docker-compose.yml", *args],
            env=self.env,
            quiet=quiet,
        )

    def up(self) -> None:
        started = time.monotonic()
        self("up", "-d", "--no-build", "--scale", f"api={REPLICAS}")
        log(f"stack up in {time.monotonic() - started:.1f} s (postgres, migrate, api x3, lb)")

    def replicas(self) -> list[tuple[str, str]]:
        """(name, state) of the api containers, running or not."""
        listed = run(
            [
                "docker",
                "ps",
                "-a",
                "--filter",
                f"label=com.docker.compose.project={PROJECT}",
                "--filter",
                "label=com.docker.compose.service=api",
                "--format",
                "{{.Names}}\t{{.Status}}",
            ],
            quiet=True,
        ).stdout.split("\n")
        return sorted(tuple(line.split("\t", 1)) for line in listed if line)  # type: ignore[misc]


def build(args: argparse.Namespace) -> None:
    options = ["--network", args.build_network] if args.build_network else []
    torch_args = []
    if args.torch:
        torch_args += ["--build-arg", f"TORCH={args.torch}"]
    if args.torch_index:
        torch_args += ["--build-arg", f"TORCH_INDEX={args.torch_index}"]
    for tag, context, extra in (
        ("fastadapt:latest", ".", torch_args),
        ("fastadapt-lb:latest", "deploy/lb", []),
    ):
        started = time.monotonic()
        done = run(["docker", "build", *options, *extra, "-t", tag, context], quiet=True)
        steps = sum(line.startswith("Step ") for line in done.stdout.splitlines())
        cached = done.stdout.count("Using cache")
        size = run(
            ["docker", "image", "inspect", "--format", "{{.Size}}", tag], quiet=True
        ).stdout.strip()
        log(
            f"built {tag} from {context} in {time.monotonic() - started:.1f} s "
            f"({steps} steps, {cached} cached; {int(size) / 1e6:.0f} MB)"
        )


# -- HTTP through the load balancer ---------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: Any
    replica: str


@dataclass
class Tally:
    """Every request the smoke made, and what it took."""

    requests: int = 0
    first_try: int = 0
    retried: int = 0
    failed: int = 0
    setbacks: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def line(self) -> str:
        setbacks = ", ".join(f"{n} x {what}" for what, n in self.setbacks.most_common())
        return (
            f"{self.requests} requests: {self.first_try} answered at once, {self.retried} after "
            f"a retry, {self.failed} failed" + (f" (retried on: {setbacks})" if setbacks else "")
        )


class Api:
    def __init__(self, port: int, tally: Tally) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.key = ""
        self.tally = tally

    def once(
        self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None
    ) -> Answer:
        data = None if body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}
        if self.key and "Authorization" not in sent:
            sent["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.base + path, data, sent, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                raw = response.read()
                status, replica = response.status, response.headers.get("X-Fastadapt-Replica")
        except urllib.error.HTTPError as error:
            raw = error.read()
            status, replica = error.code, error.headers.get("X-Fastadapt-Replica")
        try:  # the load balancer's own 502/503 pages are HTML
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return Answer(status, parsed, replica or "-")

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        expect: int = 200,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """One request, retried (up to 30 times, 0.5 s apart) while the deployment is
        transiently unable to answer; anything else unexpected fails the smoke. A POST is
        retried safely when it carries an Idempotency-Key (the same on every attempt)."""
        for attempt in range(30):
            try:
                answer = self.once(method, path, body, headers=headers)
                setback = f"HTTP {answer.status}" if answer.status in RETRYABLE else ""
            except (ConnectionError, TimeoutError, urllib.error.URLError) as exc:
                answer, setback = None, type(getattr(exc, "reason", exc)).__name__
            if not setback and answer is not None:
                with self.tally.lock:
                    self.tally.requests += 1
                    if attempt == 0:
                        self.tally.first_try += 1
                    else:
                        self.tally.retried += 1
                if answer.status != expect:
                    raise SmokeError(f"{method} {path}: {answer.status} {answer.body}")
                return answer
            with self.tally.lock:
                self.tally.setbacks[setback] += 1
            time.sleep(0.5)
        with self.tally.lock:
            self.tally.requests += 1
            self.tally.failed += 1
        raise SmokeError(f"{method} {path}: still failing after 30 attempts")


def wait_ready(api: Api, stack: Stack, *, seconds: float = 600) -> None:
    """Until every replica is healthy and the load balancer spreads requests over all."""
    deadline = time.monotonic() + seconds
    seen: set[str] = set()
    while time.monotonic() < deadline:
        states = stack.replicas()
        healthy = sum("(healthy)" in state for _, state in states)
        seen = set()
        if healthy == REPLICAS:
            for n in range(48):  # the hash spreads these keys: every replica gets some
                try:
                    answer = api.once("GET", "/readyz", headers={"Authorization": f"probe-{n}"})
                except (ConnectionError, urllib.error.URLError):
                    break
                if answer.status == 200:
                    seen.add(answer.replica)
            if len(seen) == REPLICAS:
                log(f"{REPLICAS} replicas healthy, the load balancer reaches {sorted(seen)}")
                return
        time.sleep(2)
    raise SmokeError(
        f"not ready after {seconds:.0f} s: replicas {stack.replicas()}, reached {sorted(seen)}"
    )


# -- the clients ----------------------------------------------------------------------------


@dataclass
class Client:
    name: str
    amplitude: float
    phase: float
    acknowledged: list[int] = field(default_factory=list)
    replicas: Counter[str] = field(default_factory=Counter)

    def support(self, rng: random.Random) -> dict[str, Any]:
        xs = sorted(rng.uniform(-5, 5) for _ in range(10))
        ys = [self.amplitude * math.sin(x - self.phase) for x in xs]
        return {"meta_model": "sinusoid", "support": {"inputs": [[x] for x in xs], "targets": ys}}


def adapt_then_predict(api: Api, client: Client, rng: random.Random) -> None:
    """Adapt, then predict from the new version on the very next request."""
    adapted = api.call(
        "POST",
        f"/v1/clients/{client.name}/adaptations",
        client.support(rng),
        expect=201,
        headers={"Idempotency-Key": uuid.uuid4().hex},  # a retry after a lost answer: once
    )
    version = adapted.body["version"]
    client.acknowledged.append(version)
    client.replicas[adapted.replica] += 1
    query = "&".join(f"x={x}" for x in QUERY)
    predicted = api.call("GET", f"/v1/clients/{client.name}/predictions?{query}")
    client.replicas[predicted.replica] += 1
    if predicted.body["version"] != version:
        raise SmokeError(
            f"{client.name}: adapted version {version}, the next prediction came from "
            f"version {predicted.body['version']}"
        )
    if not all(math.isfinite(p) for p in predicted.body["predictions"]):
        raise SmokeError(f"{client.name}: predictions {predicted.body['predictions']}")


def snapshot(api: Api, clients: list[Client]) -> dict[str, dict[int, list[float]]]:
    """Every stored version of every client and its predictions at QUERY; checks that the
    versions are the newest ``VERSIONS_KEPT`` up to the current one with no gap (retention
    prunes older ones) and that every acknowledged version among them is there."""
    query = "&".join(f"x={x}" for x in QUERY)
    stored: dict[str, dict[int, list[float]]] = {}
    for client in clients:
        history = api.call("GET", f"/v1/clients/{client.name}").body
        versions = sorted(v["version"] for v in history["versions"])
        current = history["current_version"]
        oldest = max(1, current - VERSIONS_KEPT + 1)
        if versions != list(range(oldest, current + 1)):
            raise SmokeError(f"{client.name}: versions {versions}, current {current}")
        missing = {v for v in client.acknowledged if v >= oldest} - set(versions)
        if missing:
            raise SmokeError(f"{client.name}: acknowledged versions {sorted(missing)} are gone")
        stored[client.name] = {
            v: api.call("GET", f"/v1/clients/{client.name}/predictions?{query}&version={v}").body[
                "predictions"
            ]
            for v in versions
        }
    return stored


def traffic(api: Api, clients: list[Client], stop: threading.Event, seed: int) -> None:
    """Adapt then predict, over and over, for clients no other thread touches (so that
    "the next request" sees this thread's version)."""
    rng = random.Random(seed)
    while not stop.is_set():
        adapt_then_predict(api, rng.choice(clients), rng)


# -- the smoke ------------------------------------------------------------------------------


def smoke(args: argparse.Namespace) -> None:
    stack = Stack(compose_command(), args.port)
    engine = run(["docker", "version", "--format", "{{.Server.Version}}"], quiet=True)
    log(
        f"docker engine {engine.stdout.strip()} at {os.environ.get('DOCKER_HOST', 'the default')}"
        f", compose: {' '.join(stack.compose)}, project {PROJECT}, load balancer "
        f"127.0.0.1:{args.port}"
    )
    stack("down", "-v", "--remove-orphans", quiet=True)

    log("== build")
    build(args)

    log(f"== up: postgres, migrate, {REPLICAS} api replicas, the load balancer")
    stack.up()
    tally = Tally()
    api = Api(args.port, tally)
    wait_ready(api, stack)

    created = stack("run", "--rm", "--no-deps", "-T", "api", "keys", "create", "--tenant", "smoke",
                    "--scope", "admin")  # fmt: skip
    lines = created.stdout.strip().splitlines()
    api.key = lines[-1].strip()
    log(f"{next(line for line in lines if line.startswith('created key'))} (the key not shown)")
    unauthorized = api.once("GET", "/v1/meta-models", headers={"Authorization": "Bearer nope"})
    if unauthorized.status != 401:
        raise SmokeError(f"a wrong key answered {unauthorized.status}")
    log("a wrong key: 401 (the image requires keys)")

    log(f"== adapt, then predict on the next request: {CLIENTS} clients, twice each")
    rng = random.Random(12)
    clients = [
        Client(f"smoke-{n:02d}", rng.uniform(0.5, 4.5), rng.uniform(0, math.pi))
        for n in range(CLIENTS)
    ]
    for _ in range(2):
        for client in clients:
            adapt_then_predict(api, client, rng)
    home = {client.name: client.replicas.most_common(1)[0][0] for client in clients}
    spread = Counter(home.values())
    split = [client.name for client in clients if len(client.replicas) > 1]
    log(f"clients per replica: {dict(sorted(spread.items()))}; every request of a client on "
        f"one replica: {'yes' if not split else 'no, ' + ', '.join(split)}")  # fmt: skip
    if split:
        raise SmokeError(f"the consistent hash split clients over replicas: {split}")
    log(tally.line())

    log("== stop a replica while requests continue (4 threads of adapt + predict)")
    stop = threading.Event()
    failures: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            traffic(api, clients[seed::4], stop, seed)
        except BaseException as exc:
            failures.append(exc)

    before = Tally(**{k: getattr(tally, k) for k in ("requests", "first_try", "retried")})
    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(4)
    victim = stack.replicas()[1][0]
    started = time.monotonic()
    run(["docker", "stop", victim])
    log(f"{victim} stopped in {time.monotonic() - started:.1f} s; traffic goes on for 10 s")
    for client in clients:
        client.replicas.clear()
    time.sleep(10)
    stop.set()
    for thread in threads:
        thread.join()
    if failures:
        raise SmokeError(f"traffic during the stop: {failures[0]}") from failures[0]
    states = ", ".join(f"{name} {state.split(' (')[0].lower()}" for name, state in stack.replicas())
    log(f"replicas now: {states}")
    since = {c.name: c.replicas.most_common(1)[0][0] for c in clients if c.replicas}
    gone = set(spread) - set(since.values())
    moved = Counter(since[name] for name, was in home.items() if was in gone and name in since)
    stayed = [name for name, now in since.items() if home[name] not in gone]
    strays = [name for name in stayed if since[name] != home[name]]
    log(
        f"the load balancer's {'/'.join(sorted(gone)) or '?'} is gone: its clients went to "
        f"{dict(sorted(moved.items()))}; of the {len(stayed)} others seen since, "
        f"{len(stayed) - len(strays)} stayed on their replica (consistent hash)"
    )
    if len(gone) != 1 or strays:
        raise SmokeError(f"after the stop: replicas gone {gone}, clients that moved {strays}")
    log(
        f"during the stop: {tally.requests - before.requests} requests, "
        f"{tally.first_try - before.first_try} answered at once, "
        f"{tally.retried - before.retried} after a retry, {tally.failed} failed"
    )
    log(tally.line())

    stored = snapshot(api, clients)
    versions = sum(len(v) for v in stored.values())
    acknowledged = sum(len(client.acknowledged) for client in clients)
    kept = sum(len(set(c.acknowledged) & set(stored[c.name])) for c in clients)
    log(
        f"{acknowledged} versions acknowledged for {CLIENTS} clients; the newest "
        f"{VERSIONS_KEPT} of each kept ({versions} stored), with no gap, all {kept} "
        "acknowledged ones among them present"
        + (f" ({versions - kept} unacknowledged)" if versions != kept else "")
    )

    log("== restart the stack: down (the volume kept), up")
    stack("down")
    stack.up()
    wait_ready(api, stack)
    after = snapshot(api, clients)
    changed = [
        f"{name} v{v}"
        for name, by_version in stored.items()
        for v, predictions in by_version.items()
        if after[name].get(v) is None
        or max(abs(a - b) for a, b in zip(predictions, after[name][v], strict=True)) > 1e-6
    ]
    if changed or after.keys() != stored.keys():
        raise SmokeError(f"after the restart these versions changed or vanished: {changed}")
    log(f"after the restart: all {versions} versions there, each predicting as before")
    adapt_then_predict(api, clients[0], rng)
    log(f"and adaptation goes on: {clients[0].name} is at version {clients[0].acknowledged[-1]}")
    log(tally.line())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("SMOKE_PORT", "18080")))
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    parser.add_argument("--build-network", default=os.environ.get("DOCKER_BUILD_NETWORK"))
    parser.add_argument("--torch", default=os.environ.get("DOCKER_HERE_TORCH"))
    parser.add_argument("--torch-index", default=os.environ.get("DOCKER_HERE_INDEX"))
    args = parser.parse_args()
    if args.build_network is None and os.environ.get("DOCKER_HERE_TORCH"):
        args.build_network = "host"
    stack = Stack(compose_command(), args.port)
    try:
        smoke(args)
    except (SmokeError, subprocess.SubprocessError, OSError) as exc:
        log(f"docker-smoke: FAILED: {exc}")
        for name, _ in stack.replicas():
            print(f"--- last lines of {name}", flush=True)
            subprocess.run(["docker", "logs", "--tail", "15", name], cwd=ROOT)
        return 1
    finally:
        if not args.keep:
            log("== tear down (down -v: the smoke's containers, network and volume)")
            subprocess.run(
                [*stack.compose, "-p", PROJECT, "-f", "docker-compose.yml", "down", "-v",
                 "--remove-orphans"],
                cwd=ROOT, env=stack.env, capture_output=True,
            )  # fmt: skip
    log("docker-smoke: PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
